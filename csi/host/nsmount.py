"""Hot-plug: move a mount into another process's mount namespace.

The kernel's mount API does it without ever mounting at the requested path
on the host: ``open_tree(OPEN_TREE_CLONE)`` takes a detached copy of a host
mount, the copy is carried (as a file descriptor) into the target namespace
by ``setns``, and ``move_mount`` attaches it there.

``setns(CLONE_NEWNS)`` refuses a multi-threaded caller, and any process that
talks gRPC has threads, so the namespace half runs in a fresh helper process
(``python -m csi.host.nsmount``) that inherits the descriptor.

Inside the namespace, the path is opened component by component from the
namespace's root without following symlinks, and the mount is moved onto
that descriptor, so a symlink planted in the container cannot redirect it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import os
import stat
import sys

from csi.host.mountinfo import MountTable, parse

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
CLONE_NEWNS = 0x00020000
AT_FDCWD = -100
UMOUNT_NOFOLLOW = 8

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def open_tree_clone(path: str) -> int:
    """A detached copy of the mount at ``path`` (host side)."""
    rc = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(path), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    return _check(int(rc), "open_tree")


def _setns(pid: int) -> None:
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNS), "setns")
    finally:
        os.close(fd)
    os.chdir("/")


def _walk(path: str, *, create: bool, want_dir: bool) -> tuple[int, int]:
    """(parent fd, target fd) for an absolute path, refusing symlinks anywhere."""
    if not path.startswith("/") or os.path.normpath(path) != path or path == "/":
        raise ValueError("the path must be absolute and normalised, and not /")
    parts = path.strip("/").split("/")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            nxt = _open_dir(fd, part, create)
            os.close(fd)
            fd = nxt
        name = parts[-1]
        try:
            target = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
            if want_dir:
                os.mkdir(name, 0o755, dir_fd=fd)
            else:
                os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600, dir_fd=fd))
            target = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        mode = os.fstat(target).st_mode
        if stat.S_ISLNK(mode):
            os.close(target)
            raise PermissionError(errno.ELOOP, f"{path} is a symlink; refusing it")
        if want_dir != stat.S_ISDIR(mode):
            os.close(target)
            raise NotADirectoryError(errno.ENOTDIR, f"{path} is not a {'directory' if want_dir else 'file'}")
        return fd, target
    except BaseException:
        os.close(fd)
        raise


def _open_dir(fd: int, part: str, create: bool) -> int:
    try:
        return os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
        os.mkdir(part, 0o755, dir_fd=fd)
        return os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    except (NotADirectoryError, OSError) as e:
        if isinstance(e, NotADirectoryError) or e.errno == errno.ELOOP:
            raise PermissionError(
                errno.ELOOP, f"a component of the path is a symlink or not a directory: {part!r}"
            ) from e
        raise


def attach_in_namespace(pid: int, tree_fd: int, path: str, want_dir: bool) -> None:
    _setns(pid)
    parent, target = _walk(path, create=True, want_dir=want_dir)
    try:
        rc = _libc.syscall(SYS_MOVE_MOUNT, tree_fd, b"", target, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)
        _check(int(rc), "move_mount")
    finally:
        os.close(target)
        os.close(parent)


def detach_in_namespace(pid: int, path: str, device: tuple[int, int] | None) -> bool:
    """Unmount the volume at ``path`` in the namespace. False if not mounted there.

    The namespace's mount table is read from the host's /proc/PID/mountinfo
    *before* entering it: inside, /proc (if any) belongs to the container's
    PID namespace, where this helper has no /proc/self.
    """
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        top = MountTable(parse(f.read())).top(path)
    if top is None:
        return False
    if device is not None and (top.major, top.minor) != device and top.fstype != "devtmpfs":
        raise PermissionError(errno.EPERM, f"{path} holds another filesystem; refusing to unmount it")
    _setns(pid)
    parent, target = _walk(path, create=False, want_dir=stat.S_ISDIR(_lstat_mode(path)))
    os.close(target)
    try:
        # Unmount relative to the parent's descriptor (fchdir): the path cannot be
        # redirected, and no /proc is needed inside the namespace.
        os.fchdir(parent)
        _check(_libc.umount2(os.fsencode(path.rsplit("/", 1)[1]), UMOUNT_NOFOLLOW), "umount")
        os.chdir("/")
        return True
    finally:
        os.close(parent)


def _lstat_mode(path: str) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return stat.S_IFDIR


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m csi.host.nsmount")
    sub = p.add_subparsers(dest="op", required=True)
    a = sub.add_parser("attach")
    a.add_argument("--pid", type=int, required=True)
    a.add_argument("--path", required=True)
    a.add_argument("--fd", type=int, required=True)
    a.add_argument("--file", action="store_true", help="the mount is a device node (raw block)")
    d = sub.add_parser("detach")
    d.add_argument("--pid", type=int, required=True)
    d.add_argument("--path", required=True)
    d.add_argument("--dev", default=None, help="MAJ:MIN the mount must belong to")
    args = p.parse_args(argv)
    try:
        if args.op == "attach":
            attach_in_namespace(args.pid, args.fd, args.path, want_dir=not args.file)
        else:
            dev = tuple(int(x) for x in args.dev.split(":")) if args.dev else None
            if not detach_in_namespace(args.pid, args.path, dev):  # type: ignore[arg-type]
                print(f"nothing is mounted at {args.path}", file=sys.stderr)
                return 3
    except (OSError, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
