"""ELV grows a mounted ext4 filesystem through the kernel's resize ioctl, not
a resize2fs process (csi/host/ext4resize.py). Here each kind of ext4 a user
may bring is made twice on identical loop devices, both are grown in place
while mounted, one by resize2fs and one by ELV, and they must end with the
same block count, a clean fsck and the data written before the growth. The
block counts are read by dumpe2fs, not by ELV's own superblock parser.

It runs in the guest (scripts/lvm-vm) though it needs no LVM: growing a
mounted ext4 takes CAP_SYS_RESOURCE, which root on the development VM lacks
(its CapEff has bit 24 clear), and the guest's root has."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from csi.errors import FailedPrecondition
from csi.host.fs import CAP_SYS_RESOURCE, FsTool, has_capability
from tests.support.fakes import FakeRunner

MiB = 1 << 20

#: mkfs.ext4 options of the filesystems users bring: the default, small blocks
#: (1 KiB < a page: the count is rounded to whole pages), no 64bit feature,
#: no resize inode (the kernel converts to meta_bg online), and meta_bg.
KINDS = {
    "default": [],
    "1k-blocks": ["-b", "1024"],
    "no-64bit": ["-O", "^64bit"],
    "no-resize-inode": ["-O", "^resize_inode"],
    "meta-bg": ["-O", "^resize_inode,meta_bg"],
}


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{argv}: {r.stderr}"
    return r.stdout


def block_count(dev: str) -> int:
    for line in sh("dumpe2fs", "-h", dev).splitlines():
        if line.startswith("Block count:"):
            return int(line.split(":")[1])
    raise AssertionError(f"dumpe2fs -h {dev} printed no block count")


class Twin:
    """One filesystem on a loop device over a sparse file, mounted."""

    def __init__(self, stack: ExitStack, base: str, name: str, mkfs: list[str]) -> None:
        self.image = os.path.join(base, name + ".img")
        with open(self.image, "wb") as f:
            f.truncate(64 * MiB)
        self.dev = sh("losetup", "--find", "--show", self.image).strip()
        stack.callback(sh, "losetup", "-d", self.dev)
        sh("mkfs.ext4", "-q", "-F", "-U", "clear", "-E", "nodiscard", *mkfs, self.dev)
        self.mnt = os.path.join(base, name)
        os.mkdir(self.mnt)
        sh("mount", "-t", "ext4", self.dev, self.mnt)
        self.mounted = True
        stack.callback(self.unmount)
        self.data = os.urandom(3 * MiB)
        with open(os.path.join(self.mnt, "data"), "wb") as f:
            f.write(self.data)
            f.flush()
            os.fsync(f.fileno())

    def unmount(self) -> None:
        if self.mounted:
            sh("umount", self.mnt)
            self.mounted = False

    def enlarge(self, size: int) -> None:
        os.truncate(self.image, size)
        sh("losetup", "-c", self.dev)

    def reads_back(self) -> bool:
        with open(os.path.join(self.mnt, "data"), "rb") as f:
            return hashlib.sha256(f.read()).digest() == hashlib.sha256(self.data).digest()


@pytest.fixture(autouse=True)
def _capable() -> None:
    if not has_capability(CAP_SYS_RESOURCE):
        pytest.fail("growing a mounted ext4 needs CAP_SYS_RESOURCE: run this in the guest (scripts/lvm-vm)")


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_grows_as_resize2fs_does(kind: str, base: str, stack: ExitStack) -> None:
    theirs = Twin(stack, base, "theirs", KINDS[kind])
    ours = Twin(stack, base, "ours", KINDS[kind])
    before = block_count(ours.dev)
    assert before == block_count(theirs.dev)
    # Not a whole number of pages, nor of block groups.
    grown = 134 * MiB + 5 * 1024
    for t in (theirs, ours):
        t.enlarge(grown)
    sh("resize2fs", theirs.dev)
    runner = FakeRunner()
    asyncio.run(FsTool(runner).grow("ext4", ours.dev, ours.mnt))  # type: ignore[arg-type]
    assert runner.argvs() == [], "the ioctl grows it; no resize2fs process"
    after = block_count(ours.dev)
    assert after > before
    assert after == block_count(theirs.dev), "the same block count resize2fs picked"
    st = os.statvfs(ours.mnt)
    assert st.f_blocks * st.f_frsize > 100 * MiB, "the mounted filesystem shows the new size"
    assert ours.reads_back() and theirs.reads_back()
    # Growing again when there is nothing to grow changes nothing.
    asyncio.run(FsTool(runner).grow("ext4", ours.dev, ours.mnt))  # type: ignore[arg-type]
    assert block_count(ours.dev) == after and runner.argvs() == []
    for t in (ours, theirs):
        t.unmount()
        sh("e2fsck", "-f", "-n", t.dev)  # exit 0: clean


def test_refuses_a_mount_point_that_shows_another_device(base: str, stack: ExitStack) -> None:
    a = Twin(stack, base, "a", [])
    b = Twin(stack, base, "b", [])
    a.enlarge(96 * MiB)
    before = block_count(a.dev)
    with pytest.raises(FailedPrecondition, match="no longer shows"):
        asyncio.run(FsTool(FakeRunner()).grow("ext4", a.dev, b.mnt))  # type: ignore[arg-type]
    assert block_count(a.dev) == before and block_count(b.dev) == before
