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

A process in another user namespace (a rootless container) sees files owned
by ids its namespace does not map as ``nobody``, and its root cannot write
to them. ``mount_setattr(MOUNT_ATTR_IDMAP)`` with the target's user namespace
makes the detached copy an idmapped mount before it moves in (Linux 5.12+;
ext4 and xfs support it): a file owned by uid 0 on disk then shows as the
namespace's root, and what its root writes lands on disk as uid 0.
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
SYS_MOUNT_SETATTR = 442
MOUNT_ATTR_IDMAP = 0x00100000
AT_EMPTY_PATH = 0x1000
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


class _MountAttr(ctypes.Structure):
    """``struct mount_attr`` (linux/mount.h), version 0: 32 bytes."""

    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def user_namespace(pid: int | str) -> int:
    """The inode of a process's user namespace (``"self"`` for this one)."""
    return os.stat(f"/proc/{pid}/ns/user").st_ino


def idmap_tree(tree_fd: int, pid: int) -> None:
    """Make the detached mount ``tree_fd`` (from :func:`open_tree_clone`, not
    yet attached anywhere) an idmapped mount for ``pid``'s user namespace."""
    userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP, userns_fd=userns)
        rc = _libc.syscall(
            SYS_MOUNT_SETATTR,
            ctypes.c_int(tree_fd),
            ctypes.c_char_p(b""),
            ctypes.c_uint(AT_EMPTY_PATH),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        _check(int(rc), "mount_setattr(MOUNT_ATTR_IDMAP)")
    finally:
        os.close(userns)


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
