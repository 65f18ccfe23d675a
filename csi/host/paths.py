"""Staging and target paths from requests, handled without trusting them.

Every path a request names must be absolute, normalised, and strictly
beneath the configured kubelet directory (CVE-2020-8567: crafted objects
wrote files to arbitrary host paths). It is then *opened* component by
component with ``O_PATH|O_NOFOLLOW`` from the kubelet directory down, so a
symlink anywhere beneath it is refused rather than followed, and every later
operation (mount, umount, mkdir, rmdir) goes through those descriptors via
``/proc/self/fd/N``. A symlink swapped in after the check therefore cannot
redirect the operation (CVE-2021-25741 was exactly that race in kubelet).

The kubelet directory itself is admin configuration and may be a symlink.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from csi.errors import FailedPrecondition, InvalidArgument, NotFound
from csi.host import syscalls

MAX_PATH_BYTES = 4096
_DIR = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_ANY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class PathGuard:
    def __init__(self, root: str) -> None:
        if not os.path.isabs(root):
            raise ValueError("the kubelet directory must be absolute")
        self.root = os.path.normpath(root)
        self.real_root = os.path.realpath(self.root)

    # -- validation ---------------------------------------------------------

    def relative(self, path: str, field: str) -> list[str]:
        """Check a request path and return its components beneath the root."""
        if not path:
            raise InvalidArgument(f"{field} is required")
        if "\x00" in path or len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            raise InvalidArgument(f"{field} is not a valid path")
        if not path.startswith("/"):
            raise InvalidArgument(f"{field} must be an absolute path")
        if os.path.normpath(path) != path or path.startswith("//"):
            raise InvalidArgument(f"{field} must be a normalised path (no '.', '..', '//' or trailing '/')")
        prefix = self.root.rstrip("/") + "/"
        if not path.startswith(prefix) or len(path) == len(prefix):
            raise InvalidArgument(f"{field} must be beneath the kubelet directory {self.root}")
        return path[len(prefix) :].split("/")

    def real(self, path: str) -> str:
        """The path as the mount table will show it (root symlinks resolved)."""
        rel = self.relative(path, "path")
        return os.path.join(self.real_root, *rel)

    # -- descriptor walking -------------------------------------------------

    def _walk(self, parts: list[str], *, create: bool, created: list[str] | None = None) -> int:
        """Open the directory ``root/parts...`` without following any symlink;
        with ``create``, make missing ones, appending each to ``created``."""
        fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, part in enumerate(parts):
                try:
                    nxt = os.open(part, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o750, dir_fd=fd)
                        if created is not None:
                            created.append(os.path.join(self.root, *parts[: i + 1]))
                    except FileExistsError:
                        pass
                    nxt = os.open(part, _DIR, dir_fd=fd)
                except NotADirectoryError as e:
                    raise InvalidArgument(f"a component of the path is a symlink or not a directory: {part!r}") from e
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        raise InvalidArgument(f"a component of the path is a symlink: {part!r}") from e
                    raise
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    @contextlib.contextmanager
    def parent(
        self, path: str, field: str, *, create: bool = False, created: list[str] | None = None
    ) -> Iterator[tuple[int, str]]:
        """Yield (fd of the parent directory, final component name)."""
        parts = self.relative(path, field)
        try:
            fd = self._walk(parts[:-1], create=create, created=created)
        except FileNotFoundError as e:
            raise NotFound(f"{field} {path} does not exist") from e
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def lstat(self, path: str, field: str) -> os.stat_result | None:
        """lstat of the path, or None when it does not exist: a parent is
        missing, or is not a directory (a file, or a symlink, never followed)."""
        try:
            with self.parent(path, field) as (pfd, name):
                return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except (NotFound, InvalidArgument, FileNotFoundError):
            return None

    def device(self, path: str, field: str) -> tuple[int, int] | None:
        """(major, minor) of the block device node the path shows (through
        whatever is mounted on it), or None when it is not one or is missing."""
        st = self.lstat(path, field)
        if st is None or not stat.S_ISBLK(st.st_mode):
            return None
        return os.major(st.st_rdev), os.minor(st.st_rdev)

    @contextlib.contextmanager
    def open(self, path: str, field: str, *, want_dir: bool | None) -> Iterator[int]:
        """Yield an O_PATH descriptor of the path itself, refusing symlinks.
        ``want_dir``: True a directory, False a regular file, None anything
        else but a symlink (a device node bound onto a raw block target)."""
        with self.parent(path, field) as (pfd, name):
            try:
                fd = os.open(name, _ANY, dir_fd=pfd)
            except FileNotFoundError as e:
                raise NotFound(f"{field} {path} does not exist") from e
            try:
                mode = os.fstat(fd).st_mode
                if stat.S_ISLNK(mode):
                    raise InvalidArgument(f"{field} {path} is a symlink; refusing to use it")
                if want_dir and not stat.S_ISDIR(mode):
                    raise FailedPrecondition(f"{field} {path} exists and is not a directory")
                if want_dir is False and not stat.S_ISREG(mode):
                    raise FailedPrecondition(f"{field} {path} exists and is not a regular file")
                yield fd
            finally:
                os.close(fd)

    # -- operations -----------------------------------------------------------

    def make(self, path: str, field: str, *, want_dir: bool, created: list[str] | None = None) -> bool:
        """Create the final component (a directory, or an empty file for raw
        block targets) and any missing parents. True if we created it; every
        path created (parents first) is appended to ``created``, so a caller
        that fails later can remove exactly what it made."""
        with self.parent(path, field, create=True, created=created) as (pfd, name):
            try:
                if want_dir:
                    os.mkdir(name, 0o750, dir_fd=pfd)
                else:
                    fd = os.open(
                        name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640, dir_fd=pfd
                    )
                    os.close(fd)
                if created is not None:
                    created.append(path)
                return True
            except FileExistsError:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise InvalidArgument(f"{field} {path} is a symlink; refusing to use it") from None
                return False

    def remove(self, path: str, field: str) -> bool:
        """Remove the final component if it holds nothing: an empty directory
        or an empty regular file. True if it is gone (missing is fine); False
        if it was kept: it holds data, or is something else (a symlink, a
        device node), which is never ours to remove."""
        try:
            with self.parent(path, field) as (pfd, name):
                try:
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    return True
                if stat.S_ISDIR(st.st_mode):
                    try:
                        os.rmdir(name, dir_fd=pfd)
                    except OSError as e:
                        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY):
                            return False
                        raise
                    return True
                if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    os.unlink(name, dir_fd=pfd)
                    return True
                return False
        except NotFound:
            return True

    def mount(
        self, path: str, field: str, *, want_dir: bool, source: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        with self.open(path, field, want_dir=want_dir) as fd:
            syscalls.mount(source, f"/proc/self/fd/{fd}", fstype, flags, data)

    def remount(self, path: str, field: str, *, want_dir: bool | None, flags: int) -> None:
        with self.open(path, field, want_dir=want_dir) as fd:
            syscalls.mount(None, f"/proc/self/fd/{fd}", None, flags, None)

    def bind(self, source_path: str, source_field: str, path: str, field: str, *, flags: int) -> None:
        """Bind-mount one guarded path onto another (both via descriptors)."""
        with self.open(source_path, source_field, want_dir=True) as sfd, self.open(path, field, want_dir=True) as tfd:
            syscalls.mount(f"/proc/self/fd/{sfd}", f"/proc/self/fd/{tfd}", None, syscalls.MS_BIND, None)
        if flags:
            self.remount(path, field, want_dir=True, flags=syscalls.MS_REMOUNT | syscalls.MS_BIND | flags)

    def umount(self, path: str, field: str) -> None:
        """Unmount the top mount at the path. The parent is held by descriptor and
        the last component is not followed, so the path cannot be redirected."""
        with self.parent(path, field) as (pfd, name):
            syscalls.umount2(f"/proc/self/fd/{pfd}/{name}", syscalls.UMOUNT_NOFOLLOW)
