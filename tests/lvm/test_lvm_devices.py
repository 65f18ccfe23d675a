"""--lvm-devices: a VG (and its thin pool) built from empty disks only; a disk
with any signature is never touched. The "disks" are loop devices."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.support.driver import leftovers
from tests.support.lvm import GuestVg, LvmDriver, MiB, lvm, lvs, wait_for

VG = "elvdisks"


@pytest.fixture
def disks(base: str, vg: GuestVg) -> Iterator[list[str]]:
    devs: list[str] = []
    try:
        for i in range(3):
            path = os.path.join(base, f"disk{i}.img")
            with open(path, "wb") as f:
                f.truncate(320 * MiB)
            devs.append(
                subprocess.run(
                    ["losetup", "-f", "--show", path], capture_output=True, text=True, check=True
                ).stdout.strip()
            )
        subprocess.run(["mkfs.ext4", "-q", devs[2]], check=True)
        yield devs
    finally:
        if lvm("vgs", VG, check=False).returncode == 0:
            lvm("vgremove", "-f", "-y", VG, check=False)
        for d in devs:
            lvm("pvremove", "-q", "-y", d, check=False)
            subprocess.run(["losetup", "-d", d], check=False)


def test_vg_from_empty_disks(base: str, disks: list[str]) -> None:
    selector = "path=/dev/loop*,min-size=300M"
    d = LvmDriver(base, ["--lvm-vg", VG, "--lvm-thin-pool", "pool", "--lvm-devices", selector]).start()
    try:
        pvs = lvm("pvs", "--noheadings", "-o", "pv_name,vg_name").stdout.split()
        pairs = dict(zip(pvs[::2], pvs[1::2], strict=True))
        assert pairs.get(disks[0]) == VG and pairs.get(disks[1]) == VG
        assert disks[2] not in pairs, "a disk with a filesystem is never touched"
        blk = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", disks[2]], capture_output=True, text=True)
        assert blk.stdout.strip() == "ext4"
        assert any(r["lv_name"] == "pool" and r["segtype"] == "thin-pool" for r in lvs(VG))
        # The pool ELV builds zeroes new blocks and fails writes at once when full.
        assert lvm("lvs", "--noheadings", "-o", "zero,lv_when_full", f"{VG}/pool").stdout.split() == ["zero", "error"]
        assert "leaving" in d.log() and "created VG" in d.log()
        vid = d.create("on-disks", 64 * MiB)
        assert vid.startswith("v-default-")
        d.delete(vid)
        wait_for(lambda: all(not r["lv_name"].startswith("elv-") for r in lvs(VG)), 60, "delete")
    finally:
        rc = d.stop()
    assert rc == 0, d.log()[-3000:]
    assert not [x for x in leftovers(base) if x.startswith("mount")]  # the disks fixture detaches the loops
