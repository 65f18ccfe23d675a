"""Backing-file operations for the loop pool (blocking; run in worker threads)."""

from __future__ import annotations

import contextlib
import errno
import os

from csi.errors import ResourceExhausted


def _no_space(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def make_image(path: str, size: int, thick: bool) -> None:
    """Create a new image of ``size`` bytes: sparse, or fully allocated if thick.

    A fresh sparse file reads as zeros everywhere, so a new volume can never
    show a previous tenant's bytes; a thick one is allocated with fallocate,
    which also hands out zeroed (unwritten) extents.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        if thick:
            os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if _no_space(e):
            raise ResourceExhausted("the loop pool has no space left for this volume") from e
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def resize_image(path: str, size: int, thick: bool) -> None:
    """Grow an image to ``size`` (never shrinks) and make it durable."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        if thick:
            os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    except OSError as e:
        if _no_space(e):
            raise ResourceExhausted("the loop pool has no space left to grow this volume") from e
        raise
    finally:
        os.close(fd)


def sync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def proven_blank(path: str) -> bool:
    """True if the file has no data at all (only holes or unwritten extents),
    so every byte of it reads as zero: a device on it is blank without a probe."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return True  # no data from offset 0 to the end
        raise
    finally:
        os.close(fd)
    return False


def discard(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def allocated_bytes(directory: str) -> int:
    """Bytes actually allocated by the images in a directory."""
    total = 0
    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.endswith(".img"):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def file_size(path: str) -> int:
    return os.stat(path).st_size
