"""Mount options and the mount table as the node work reads them (pure).

Flags arrive allow-listed (csi.services.validation); here they become
mount(2) bits and a filesystem data string. :func:`shows` is the one test of
whether a mount is a volume's device.
"""

from __future__ import annotations

from csi.errors import InvalidArgument
from csi.host import syscalls
from csi.host.mountinfo import Mount
from csi.model import Device

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
    as devtmpfs with the node's name for root."""
    if (mount.major, mount.minor) == (dev.major, dev.minor):
        return True
    return node_bind and mount.fstype == "devtmpfs" and mount.root == "/" + dev.name
