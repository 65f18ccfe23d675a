"""A mount table in memory, for node work (csi.node.ops) without root.

NodeOps reads the table through its ``_table`` method and changes it through
its PathGuard's mount, bind, remount and umount; :meth:`FakeMounts.install`
replaces those with operations on this table. Paths are still checked and
created for real (the guard's own walking, in a temporary directory); only
the mounts are imaginary. A device ``loopN`` is 7:N and ``dm-N`` 254:N; a bind
of a device node shows as devtmpfs (0:6) with the node's name for root, as
the kernel shows it.
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from typing import Any

import pytest

from csi.host import syscalls
from csi.host.mountinfo import Mount, MountTable
from csi.host.paths import PathGuard
from csi.model import Device


def numbers(name: str) -> tuple[int, int]:
    if name.startswith("loop"):
        return 7, int(name[4:])
    if name.startswith("dm-"):
        return 254, int(name[3:])
    raise ValueError(f"the fake knows no device {name!r}")


class FakeMounts:
    def __init__(self, guard: PathGuard) -> None:
        self.guard = guard
        self.mounts: list[Mount] = []
        self._next = 100
        #: Raise this from the next call of the named operation ("mount", "bind", "remount", "umount").
        self.fail: dict[str, OSError] = {}
        #: The filesystem /dev is: devtmpfs, or the tmpfs of a container's /dev.
        self.dev_fs = "devtmpfs"

    # -- the table ------------------------------------------------------------------

    def table(self) -> MountTable:
        return MountTable(list(self.mounts))

    def stack(self, path: str) -> list[Mount]:
        return self.table().stack(self.guard.real(path))

    def top(self, path: str) -> Mount | None:
        s = self.stack(path)
        return s[0] if s else None

    def under(self, path: str) -> list[Mount]:
        real = self.guard.real(path)
        return [m for m in self.mounts if m.mount_point == real or m.mount_point.startswith(real + "/")]

    def add(
        self,
        path: str,
        major: int,
        minor: int,
        *,
        root: str = "/",
        fstype: str = "ext4",
        source: str = "",
        ro: bool = False,
    ) -> Mount:
        """Mount something at ``path`` (on top of whatever is there), as ``mount(8)`` would."""
        real = self.guard.real(path)
        below = self.table().top(real)
        self._next += 1
        m = Mount(
            self._next,
            below.mount_id if below else 1,
            major,
            minor,
            root,
            real,
            frozenset({"ro" if ro else "rw"}),
            fstype,
            source,
            frozenset({"rw"}),
        )
        self.mounts.append(m)
        return m

    def add_foreign(self, path: str) -> Mount:
        """A tmpfs that ELV did not make."""
        return self.add(path, 0, 77, fstype="tmpfs", source="foreign")

    def add_device(self, path: str, dev: Device, *, ro: bool = False) -> Mount:
        return self.add(path, dev.major, dev.minor, fstype="ext4", source=dev.path, ro=ro)

    def add_node_bind(self, path: str, dev: Device, *, ro: bool = False) -> Mount:
        return self.add(path, 0, 6, root="/" + dev.name, fstype="devtmpfs", source="udev", ro=ro)

    # -- the guard's operations -----------------------------------------------------

    def _failing(self, op: str) -> None:
        exc = self.fail.pop(op, None)
        if exc is not None:
            raise exc

    def mount(
        self, path: str, field: str, *, want_dir: bool, source: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        with self.guard.open(path, field, want_dir=want_dir):
            pass
        self._failing("mount")
        name = os.path.basename(source)
        if flags & syscalls.MS_BIND:
            self.add(path, 0, 6, root="/" + name, fstype=self.dev_fs, source="udev")
        else:
            major, minor = numbers(name)
            self.add(path, major, minor, fstype=fstype or "?", source=source, ro=bool(flags & syscalls.MS_RDONLY))

    def bind(self, source_path: str, source_field: str, path: str, field: str, *, flags: int) -> None:
        with self.guard.open(source_path, source_field, want_dir=True), self.guard.open(path, field, want_dir=True):
            pass
        self._failing("bind")
        src = self.top(source_path)
        if src is None:
            raise OSError(errno.EINVAL, "the fake binds mounts only")
        self.add(path, src.major, src.minor, root=src.root, fstype=src.fstype, source=src.source)
        if flags:
            self.remount(path, field, want_dir=True, flags=syscalls.MS_REMOUNT | syscalls.MS_BIND | flags)

    def remount(self, path: str, field: str, *, want_dir: bool | None, flags: int) -> None:
        self._failing("remount")
        top = self.top(path)
        if top is None:
            raise OSError(errno.EINVAL, "not a mount point")
        i = self.mounts.index(top)
        ro = bool(flags & syscalls.MS_RDONLY)
        self.mounts[i] = replace(top, options=frozenset({"ro" if ro else "rw"}))

    def umount(self, path: str, field: str) -> None:
        self._failing("umount")
        top = self.top(path)
        if top is None:
            raise OSError(errno.EINVAL, "not a mount point")
        self.mounts.remove(top)

    def device(self, path: str, field: str) -> tuple[int, int] | None:
        top = self.top(path)
        if top is None or top.fstype != self.dev_fs or top.root == "/":
            return None
        return numbers(top.root[1:])

    def install(self, ops: Any, monkeypatch: pytest.MonkeyPatch) -> FakeMounts:
        async def table() -> MountTable:
            return self.table()

        monkeypatch.setattr(ops, "_table", table)
        for name in ("mount", "bind", "remount", "umount", "device"):
            monkeypatch.setattr(ops.guard, name, getattr(self, name))
        return self
