"""Mount options and the mount table as the node work reads them (pure).

Flags arrive allow-listed (csi.services.validation); here they become
mount(2) bits and a filesystem data string. :func:`shows` is the one test of
whether a mount is a volume's device; :func:`users` finds every mount of a
volume's devices, and :func:`stage_marker` tells a raw block volume's stage.
"""

from __future__ import annotations

import os

from csi.errors import InvalidArgument
from csi.host import syscalls
from csi.host.mountinfo import NODE_FILESYSTEMS, Mount, MountTable
from csi.model import Device

#: A raw block volume is staged by binding its device node onto this file in
#: the staging directory. The mount is the proof, kept by the kernel (gone
#: with a reboot, as the device is), that the volume is staged at *that*
#: path: without it, a raw block stage would be the bare attached device, and
#: an unstage given any path would have to guess.
STAGED = "elv-staged-device"

FLAG_BITS = {
    "ro": syscalls.MS_RDONLY,
    "rw": 0,
    "noatime": syscalls.MS_NOATIME,
    "nodiratime": syscalls.MS_NODIRATIME,
    "relatime": syscalls.MS_RELATIME,
    "strictatime": syscalls.MS_STRICTATIME,
    "lazytime": syscalls.MS_LAZYTIME,
    "nodev": syscalls.MS_NODEV,
    "noexec": syscalls.MS_NOEXEC,
    "nosuid": syscalls.MS_NOSUID,
    "sync": syscalls.MS_SYNCHRONOUS,
    "dirsync": syscalls.MS_DIRSYNC,
}
#: Options bind mounts can carry (per-mount flags; the rest belong to the filesystem).
BIND_BITS = ("ro", "nodev", "noexec", "nosuid", "noatime", "nodiratime", "relatime", "strictatime")
FS_ONLY_OPTIONS = {
    "ext4": {"data=ordered", "data=writeback", "data=journal", "errors=remount-ro", "errors=continue", "nobarrier"},
    "xfs": {"inode64", "largeio", "noquota"},
}


def mount_options(flags: tuple[str, ...], fs_type: str) -> tuple[int, str | None]:
    """Split allow-listed flags into mount(2) bits and the filesystem data string."""
    bits = 0
    data: list[str] = []
    for f in flags:
        if f in FLAG_BITS:
            bits |= FLAG_BITS[f]
            continue
        for other, opts in FS_ONLY_OPTIONS.items():
            if f in opts and other != fs_type:
                raise InvalidArgument(f"mount flag {f!r} does not apply to {fs_type}")
        data.append(f)
    if fs_type == "xfs" and "nouuid" not in data:
        # Clones and snapshots of an xfs volume share its UUID; xfs refuses to
        # mount a second filesystem with a UUID it already has mounted.
        data.append("nouuid")
    return bits, ",".join(data) or None


def bind_bits(flags: tuple[str, ...], readonly: bool) -> int:
    bits = syscalls.MS_RDONLY if readonly else 0
    for f in flags:
        if f in BIND_BITS:
            bits |= FLAG_BITS[f]
    return bits


def shows(mount: Mount, dev: Device, *, node_bind: bool) -> bool:
    """Whether ``mount`` is ``dev``: mounted from it, or, with ``node_bind``
    (a raw block publish), a bind of its /dev node, which mountinfo shows
    as devtmpfs (or the tmpfs a container's /dev may be) with the node's
    name for root."""
    if (mount.major, mount.minor) == (dev.major, dev.minor):
        return True
    return node_bind and mount.fstype in NODE_FILESYSTEMS and mount.root == "/" + dev.name


def shows_any(mount: Mount, devs: list[Device], rdev: tuple[int, int] | None = None) -> bool:
    """Whether the mount is one of ``devs`` (a volume's device and its
    read-only views). ``rdev`` is the device the file visible at the mount
    point is, known for a path's top mount only: it recognises a node bound
    from a /dev that is not devtmpfs."""
    if any(shows(mount, d, node_bind=True) for d in devs):
        return True
    return rdev is not None and rdev in {(d.major, d.minor) for d in devs}


def users(table: MountTable, devs: list[Device], exclude: set[str]) -> list[Mount]:
    """Every mount of ``devs`` (filesystem mounts and node binds) not at a path in ``exclude``."""
    found = [m for d in devs for m in table.of_device(d.major, d.minor) + table.of_device_node(d.name)]
    return [m for m in found if m.mount_point not in exclude]


def stage_marker(mount: Mount, dev: Device, rdev: tuple[int, int] | None = None) -> bool:
    """Whether the mount is a raw block stage of ``dev`` (its node bound onto
    STAGED); ``rdev`` as for :func:`shows_any`."""
    return shows_any(mount, [dev], rdev) and os.path.basename(mount.mount_point) == STAGED
