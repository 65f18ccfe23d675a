"""Filesystems on volumes: probe, format, grow, freeze.

The one rule here is the data-loss rule: a device is formatted only after
``blkid -p`` (a low-level probe of the device itself, not a cache) proves it
blank. metal-stack/csi-driver-lvm #140 reformatted volumes on every mount
because its detection broke; TopoLVM #1035 showed volumes empty after stray
signatures confused it. So anything blkid reports, of any kind, counts as
"not blank", and the caller must never pass ``force`` flags to mkfs.
"""

from __future__ import annotations

import asyncio
import os
import struct
from dataclasses import dataclass

from csi.errors import CommandError, FailedPrecondition, InvalidArgument
from csi.host.ext4resize import ext4_geometry, grow_mounted
from csi.host.runner import Runner


@dataclass(frozen=True)
class Probe:
    """What blkid found. ``blank`` is True only when it found nothing at all."""

    blank: bool
    fstype: str | None
    fields: dict[str, str]


def parse_blkid_export(text: str) -> dict[str, str]:
    """Parse ``blkid -o export`` (KEY=value lines)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def ext4_size(sb: bytes) -> int | None:
    """Filesystem size in bytes from an ext2/3/4 superblock (the 1 KiB at offset 1024)."""
    geo = ext4_geometry(sb)
    return None if geo is None else geo.blocks * geo.block_size


def xfs_size(sb: bytes) -> int | None:
    """Data section size in bytes from an XFS superblock (sector 0)."""
    if len(sb) < 16 or sb[:4] != b"XFSB":
        return None
    blocksize, dblocks = struct.unpack_from(">IQ", sb, 4)
    return int(blocksize) * int(dblocks)


def read_head(device: str) -> bytes:
    """The device's first 4 KiB, read with O_DIRECT so a mounted filesystem's
    fresh writes are seen (the page cache of the block device may be stale)."""
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        return _read_direct(fd, 4096)
    finally:
        os.close(fd)


def read_fs_size(device: str, fstype: str) -> int | None:
    """Size the filesystem on ``device`` believes it has, read from its superblock."""
    buf = read_head(device)
    if fstype == "ext4":
        return ext4_size(buf[1024:2048])
    if fstype == "xfs":
        return xfs_size(buf[:512])
    return None


def _read_direct(fd: int, size: int) -> bytes:
    import mmap

    # O_DIRECT needs an aligned buffer; an anonymous mmap is page aligned.
    with mmap.mmap(-1, size) as m:
        n = os.readv(fd, [m])
        return bytes(m[:n])


CAP_SYS_RESOURCE = 24


def has_capability(cap: int, status: str = "/proc/self/status") -> bool:
    with open(status, encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def device_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size: int = os.lseek(fd, 0, os.SEEK_END)
        return size
    finally:
        os.close(fd)


class FsTool:
    def __init__(self, runner: Runner, *, xfs_config: str | None = None) -> None:
        self._run = runner
        self._xfs_config = xfs_config

    async def probe(self, device: str) -> Probe:
        # -p: probe the device itself, never the blkid cache; exit 2 means "nothing found".
        res = await self._run.run(["blkid", "-p", "-o", "export", "--", device], ok_codes=(0, 2), mutating=False)
        if res.returncode == 2:
            return Probe(True, None, {})
        fields = parse_blkid_export(res.text)
        fstype = fields.get("TYPE")
        return Probe(False, fstype, fields)

    async def mkfs(self, device: str, fstype: str, *, force: bool = False) -> None:
        """Format a device the caller has *just* probed blank. Without ``force``,
        if anything appeared since, mkfs itself refuses (its prompt reads EOF).
        ``force`` is only for redoing our own interrupted mkfs (see csi.node)."""
        if fstype == "ext4":
            # nodiscard: discard on a fallocated loop file punches holes and silently
            # drops a thick volume's reservation (measured in landscape notes).
            argv = ["mkfs.ext4", "-q", "-m", "0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"]
            if force:
                argv.append("-F")
        elif fstype == "xfs":
            argv = ["mkfs.xfs", "-q", "-K"]
            if force:
                argv.append("-f")
            if self._xfs_config:
                # e.g. an lts_*.conf: features older kernels can still mount.
                argv += ["-c", "options=" + self._xfs_config]
        else:
            raise InvalidArgument(f"unsupported filesystem {fstype!r}")
        argv += ["--", device] if fstype == "ext4" else [device]
        await self._run.run(argv, timeout=600)

    async def grow(self, fstype: str, device: str, mount_point: str) -> None:
        """Grow a mounted filesystem to fill its device (online)."""
        if fstype == "ext4":
            if not has_capability(CAP_SYS_RESOURCE):
                # The kernel's ext4 resize ioctl demands CAP_SYS_RESOURCE; without it
                # resize2fs fails with a bare "Permission denied".
                raise FailedPrecondition(
                    "growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE, which the driver lacks; "
                    "run the node plugin privileged, or use xfs; it will grow when the volume is next staged"
                )
            # The kernel's resize ioctl, as resize2fs would call it, without its process.
            head = await asyncio.to_thread(read_head, device)
            size = await asyncio.to_thread(device_size, device)
            if await asyncio.to_thread(grow_mounted, device, mount_point, head[1024:2048], size) is not None:
                return
            argv = ["resize2fs", device]  # a kernel without the ioctl: resize2fs knows the old way
        elif fstype == "xfs":
            argv = ["xfs_growfs", "-d", mount_point]
        else:
            raise InvalidArgument(f"unsupported filesystem {fstype!r}")
        try:
            await self._run.run(argv, timeout=600)
        except CommandError as e:
            raise FailedPrecondition(f"growing the {fstype} filesystem failed: {e.message}") from e

    async def grow_offline(self, fstype: str, device: str) -> None:
        """Grow an *unmounted* ext4 filesystem to fill its device. resize2fs insists
        on a fresh check first; e2fsck -p only makes safe, automatic repairs."""
        if fstype != "ext4":
            raise InvalidArgument(f"offline growth is for ext4, not {fstype}")
        res = await self._run.run(["e2fsck", "-f", "-p", device], ok_codes=(0, 1, 2, 4, 8), timeout=1800)
        if res.returncode >= 4:
            raise FailedPrecondition(f"e2fsck found errors it could not repair on {device}; repair the volume by hand")
        await self._run.run(["resize2fs", device], timeout=1800)

    async def freeze(self, mount_point: str) -> None:
        await self._run.run(["fsfreeze", "--freeze", mount_point])

    async def thaw(self, mount_point: str) -> None:
        await self._run.run(["fsfreeze", "--unfreeze", mount_point])
