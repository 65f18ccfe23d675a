"""Loop devices through their ioctls, without a losetup process per call.

Attaching is LOOP_CTL_GET_FREE then LOOP_CONFIGURE (Linux >= 5.8) in one
step; if another process takes the free device between the two calls the
kernel answers EBUSY and we ask for the next free one, which is the same
race losetup handles. Blocking calls: run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

LOOP_CLR_FD = 0x4C01
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_REMOVE = 0x4C81
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_DIRECT_IO = 16
#: struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }
_CONFIG = struct.Struct("<II" + "QQQQQ" + "IIII" + "64s64s32s" + "QQ" + "8Q")
_NODE_WAIT = 5.0
#: struct loop_info64 { u64 lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit;
#: u32 lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags; u8 names and key[64+64+32]; u64 lo_init[2]; }
_INFO64 = struct.Struct("<QQQQQIIII64s64s32sQQ")


def pack_config(fd: int, path: str, direct_io: bool, block_size: int = 0, read_only: bool = False) -> bytes:
    """``block_size`` 0 keeps the kernel's default (512)."""
    name = os.fsencode(path)[:63]
    flags = (LO_FLAGS_DIRECT_IO if direct_io else 0) | (LO_FLAGS_READ_ONLY if read_only else 0)
    return _CONFIG.pack(fd, block_size, 0, 0, 0, 0, 0, 0, 0, 0, flags, name, b"", b"", 0, 0, *([0] * 8))


def _open_node(path: str) -> int:
    """Open a device node that devtmpfs is creating; bounded wait, no fixed sleep."""
    deadline = time.monotonic() + _NODE_WAIT
    delay = 0.001
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def attach(
    backing_file: str,
    direct_io: bool = True,
    block_size: int = 0,
    avoid: Callable[[int], bool] | None = None,
    read_only: bool = False,
) -> str:
    """Attach ``backing_file`` to a free loop device; return its name ("loop3").
    A ``read_only`` device opens its backing file for reading only.

    ``avoid(n)`` true: a free device not to use (see csi.host.loop, "discards").
    It is removed, as the kernel hands out the lowest free device again and
    again; if it cannot be removed it is used after all."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        ffd = os.open(backing_file, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            passed: set[int] = set()
            for _ in range(64):
                n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                if avoid is not None and n not in passed and avoid(n):
                    passed.add(n)
                    if _remove(ctl, n):
                        continue
                lfd = _open_node(f"/dev/loop{n}")
                try:
                    try:
                        config = pack_config(ffd, backing_file, direct_io, block_size, read_only)
                        fcntl.ioctl(lfd, LOOP_CONFIGURE, config)
                    except OSError as e:
                        if e.errno == errno.EBUSY:
                            continue  # taken by someone else meanwhile: ask again
                        if e.errno == errno.EINVAL and direct_io:
                            # The pool filesystem cannot do direct I/O: buffered then.
                            config = pack_config(ffd, backing_file, False, block_size, read_only)
                            fcntl.ioctl(lfd, LOOP_CONFIGURE, config)
                        else:
                            raise
                    return f"loop{n}"
                finally:
                    os.close(lfd)
            raise OSError(errno.EBUSY, "no free loop device after 64 attempts")
        finally:
            os.close(ffd)
    finally:
        os.close(ctl)


def _remove(ctl: int, n: int) -> bool:
    try:
        fcntl.ioctl(ctl, LOOP_CTL_REMOVE, n)
    except OSError as e:
        # EBUSY: someone attached it meanwhile; ENODEV/ENXIO: gone already.
        log.debug("could not remove /dev/loop%d: %s", n, e)
        return e.errno in (errno.ENODEV, errno.ENXIO, errno.ENOENT)
    return True


def remove(n: int) -> bool:
    """Remove the unattached device /dev/loop<n> (LOOP_CTL_REMOVE); False if
    it is in use again. The next LOOP_CTL_GET_FREE makes a fresh one if needed."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        return _remove(ctl, n)
    finally:
        os.close(ctl)


def detach(name: str) -> None:
    """Detach a loop device; already detached is fine."""
    try:
        fd = os.open(f"/dev/{name}", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENODEV):
            return  # being torn down: the caller waits for sysfs to agree
        raise
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD, 0)
    except OSError as e:
        if e.errno != errno.ENXIO:  # ENXIO: nothing attached
            raise
    finally:
        os.close(fd)


def decode_dev(dev: int) -> tuple[int, int]:
    """The kernel's new_encode_dev() format (lo_device) as (major, minor)."""
    return (dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def backing_identity(name: str) -> tuple[int, int, int] | None:
    """(major, minor, inode) of the file behind /dev/NAME, from the kernel
    (LOOP_GET_STATUS64); None if nothing is attached or the node is gone.
    Unlike sysfs's backing_file path, this does not depend on the mount
    namespace that attached the file."""
    try:
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_INFO64.size))
    except OSError:
        return None  # ENXIO: not attached
    finally:
        os.close(fd)
    device, inode = _INFO64.unpack(raw)[:2]
    return (*decode_dev(device), inode)


def set_capacity(name: str) -> None:
    fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
    finally:
        os.close(fd)


def supported() -> bool:
    """LOOP_CONFIGURE exists from Linux 5.8."""
    with contextlib.suppress(ValueError, IndexError):
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
        return (major, minor) >= (5, 8)
    return False
