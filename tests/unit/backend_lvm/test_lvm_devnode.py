"""Device nodes by major:minor without udev: bounded waits, nodes made where
nothing else makes them, and the dm names LVM uses. Runs on fake sysfs and
/dev trees (mknod needs root; the unit layer runs as root in CI)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from csi.backend.lvm import devnode
from csi.errors import Internal


def fake_sys(tmp: Path, major: int, minor: int, name: str) -> str:
    sysdev = tmp / "sys-dev-block"
    sysdev.mkdir(exist_ok=True)
    target = tmp / "devices" / name
    target.mkdir(parents=True, exist_ok=True)
    os.symlink(target, sysdev / f"{major}:{minor}")
    return str(sysdev)


def test_dm_names() -> None:
    assert devnode.dm_name("vg0", "elv-v-thin-ab") == "vg0-elv--v--thin--ab"
    assert devnode.dm_name("my-vg", "lv", "cow") == "my--vg-lv-cow"


def test_kernel_name(tmp_path: Path) -> None:
    sysdev = fake_sys(tmp_path, 254, 3, "dm-3")
    assert devnode.kernel_name(254, 3, sysdev) == "dm-3"
    assert devnode.kernel_name(254, 4, sysdev) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
async def test_makes_a_missing_node_only_when_allowed(tmp_path: Path) -> None:
    sysdev = fake_sys(tmp_path, 7, 200, "loop200")
    dev = tmp_path / "dev"
    dev.mkdir()
    with pytest.raises(Internal, match="did not appear"):
        await devnode.wait_for_device(7, 200, timeout=0.1, make_nodes=False, sys_dev_block=sysdev, dev=str(dev))
    got = await devnode.wait_for_device(7, 200, timeout=1, make_nodes=True, sys_dev_block=sysdev, dev=str(dev))
    st = os.stat(got.path)
    assert got.name == "loop200" and stat.S_ISBLK(st.st_mode) and os.minor(st.st_rdev) == 200


async def test_waits_until_the_kernel_has_the_device(tmp_path: Path) -> None:
    sysdev = tmp_path / "sys-dev-block"
    sysdev.mkdir()
    dev = tmp_path / "dev"
    dev.mkdir()

    async def appear() -> None:
        await asyncio.sleep(0.05)
        fake_sys(tmp_path, 1, 3, "null3")
        os.symlink("/dev/null", dev / "null3")  # a char device: never accepted

    task = asyncio.create_task(appear())
    with pytest.raises(Internal):
        await devnode.wait_for_device(1, 3, timeout=0.3, sys_dev_block=str(sysdev), dev=str(dev))
    await task


def test_find_dm_by_name(tmp_path: Path) -> None:
    for n, (name, dev) in enumerate([("vg-a", "254:0"), ("vg-a-cow", "254:1")]):
        d = tmp_path / f"dm-{n}" / "dm"
        d.mkdir(parents=True)
        (d / "name").write_text(name + "\n")
        (tmp_path / f"dm-{n}" / "dev").write_text(dev + "\n")
    (tmp_path / "loop0").mkdir()
    assert devnode.find_dm_by_name("vg-a-cow", str(tmp_path)) == ("dm-1", 254, 1)
    assert devnode.find_dm_by_name("vg-b", str(tmp_path)) is None
    assert devnode.find_dm_by_name("x", str(tmp_path / "missing")) is None


def test_scan_dm_by_name_says_when_it_is_not_sure(tmp_path: Path) -> None:
    """A dm device torn down while it is read makes sysfs fail (EINVAL in the
    guest): that entry is skipped and "not found" is then not proof."""
    good = tmp_path / "dm-0" / "dm"
    good.mkdir(parents=True)
    (good / "name").write_text("vg-a\n")
    (tmp_path / "dm-0" / "dev").write_text("254:0\n")
    assert devnode.scan_dm_by_name("vg-b", str(tmp_path)) == (None, True)
    (tmp_path / "dm-1" / "dm" / "name").mkdir(parents=True)  # reading it fails with an OSError
    assert devnode.scan_dm_by_name("vg-b", str(tmp_path)) == (None, False)
    assert devnode.scan_dm_by_name("vg-a", str(tmp_path)) == (("dm-0", 254, 0), True)
