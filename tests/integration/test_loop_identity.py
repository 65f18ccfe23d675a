"""A loop device attached through a mount that is gone, as after the node
plugin's container restarts: the kernel then shows its file relative to that
mount's root, and the driver must still know the file is attached (or a
restage attaches it twice, and an unstage leaves it behind). Real kernel,
real loop devices; the mount namespace is one the test makes and lets die."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.host import loop
from csi.host.runner import Runner


@pytest.fixture
def attached_elsewhere(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    pool, alt = tmp_path / "pool", tmp_path / "alt"
    (pool / "volumes").mkdir(parents=True)
    alt.mkdir()
    image = pool / "volumes" / "v.img"
    image.write_bytes(b"")
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    # Attached from a private mount namespace, through a bind mount of the pool
    # that goes with it, as a container's hostPath does.
    script = f'mount --bind "{pool}" "{alt}" && losetup --find --show "{alt}/volumes/v.img"'
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=True,
    )
    dev = out.stdout.strip()
    try:
        yield image, dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


async def test_a_file_attached_through_a_gone_mount_is_still_found(attached_elsewhere: tuple[Path, str]) -> None:
    image, dev = attached_elsewhere
    name = dev.removeprefix("/dev/")
    shown = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    assert shown == "/volumes/v.img", "the kernel shows the path through the mount, which is gone"
    assert [d.name for d in loop.find(str(image))] == [name]
    tool = loop.LoopTool(Runner())
    tool.seed()
    assert tool.lookup(str(image)) is not None
    before = {d.name for d in loop.scan()}
    assert (await tool.attach(str(image))).name == name  # not a second device
    assert {d.name for d in loop.scan()} == before
