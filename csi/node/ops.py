"""Node-side work shared by every backend: format, mount, bind, unmount.

The backend only makes a block device appear (attach) or go (detach); this
module decides what to do with it. The mount table in /proc/self/mountinfo
is the truth for what is staged and published, read fresh on every call, so
repeats and retries see the real state, never a cached guess.

Callers hold the volume's gate (csi.services.gate), so one volume never has two of
these running at once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from dataclasses import dataclass

from csi.backend.base import NodeBackend
from csi.errors import (
    AlreadyExists,
    ElvError,
    FailedPrecondition,
    Internal,
    InUse,
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from csi.host import syscalls
from csi.host.fs import FsTool, device_size, read_fs_size
from csi.host.mountinfo import Mount, MountTable
from csi.host.paths import PathGuard
from csi.model import DEFAULT_FS, AccessType, Capability, Device, Health, Mode, Volume, round_up
from csi.node.mounts import bind_bits, mount_options, shows

log = logging.getLogger(__name__)

#: Unmount at most this many stacked mounts at one path; a path that stays a
#: mount point after that (umount says EINVAL but mountinfo lists it, e.g. a
#: mount hidden under another) is reported instead of retried forever.
MAX_STACKED = 16


@dataclass(frozen=True)
class Stats:
    block: bool
    total: int
    available: int
    used: int
    inodes: int
    inodes_free: int
    inodes_used: int
    health: Health


def _superblock_size(device: str, fs_type: str) -> int | None:
    """The filesystem size from its superblock, or None if it is not there (or
    unreadable: the caller then asks blkid for the full story)."""
    try:
        return read_fs_size(device, fs_type)
    except OSError:
        return None


def _mount_error(e: OSError, what: str) -> ElvError:
    if e.errno in (errno.EINVAL, errno.EUCLEAN, errno.EBADMSG):
        return FailedPrecondition(f"{what} failed: {e.strerror} (the filesystem may be damaged or the options invalid)")
    return Internal(f"{what} failed: {e.strerror}")


class NodeOps:
    def __init__(self, backend: NodeBackend, guard: PathGuard, fs: FsTool) -> None:
        self.backend = backend
        self.guard = guard
        self.fs = fs

    async def _volume(self, volume_id: str) -> Volume:
        vol = await self.backend.get_volume(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return vol

    @staticmethod
    async def _table() -> MountTable:
        return await asyncio.to_thread(MountTable.load)

    def _check_access(self, vol: Volume, cap: Capability) -> str | None:
        if vol.access != cap.access:
            raise FailedPrecondition(
                f"volume {vol.id} was created for {vol.access.value} access, not {cap.access.value}"
            )
        if cap.access == AccessType.BLOCK:
            return None
        want = cap.fs_type or vol.formatted or vol.fs_type or DEFAULT_FS
        have = vol.formatted or vol.fs_type
        if have and want != have:
            raise FailedPrecondition(f"volume {vol.id} holds {have}; it cannot be used as {want}")
        return want

    # -- stage --------------------------------------------------------------------

    async def stage(self, volume_id: str, staging: str, cap: Capability) -> None:
        vol = await self._volume(volume_id)
        fs_type = self._check_access(vol, cap)
        real = self.guard.real(staging)
        was_attached = await self.backend.find_device(volume_id) is not None
        dev = await self.backend.attach(volume_id)
        if fs_type is None:
            return  # raw block: the attached device is the staged state
        try:
            await self._stage_mount(vol, dev, fs_type, staging, real, cap)
        except BaseException:
            # Leave no loop device behind for a stage that did not happen.
            if not was_attached and not self._users(await self._table(), dev, set()):
                await self.backend.detach(volume_id)
            raise

    async def _stage_mount(
        self, vol: Volume, dev: Device, fs_type: str, staging: str, real: str, cap: Capability
    ) -> None:
        table = await self._table()
        top = table.top(real)
        if top is not None:
            if not shows(top, dev, node_bind=False):
                raise AlreadyExists(f"another device is already mounted at {staging}")
            if cap.mount_flags and ("ro" in cap.mount_flags) != top.readonly:
                raise AlreadyExists(f"volume {vol.id} is staged at {staging} with other mount flags")
            return
        await asyncio.to_thread(self.guard.make, staging, "staging_target_path", want_dir=True)
        fresh = await self._format_if_blank(vol, dev, fs_type)
        bits, data = mount_options(cap.mount_flags, fs_type)
        if not fresh and fs_type == "ext4" and await self._smaller(fs_type, dev):
            # Grow before mounting: offline ext4 growth needs no special capability.
            await self.fs.grow_offline(fs_type, dev.path)
        try:
            await asyncio.to_thread(
                self.guard.mount,
                staging,
                "staging_target_path",
                want_dir=True,
                source=dev.path,
                fstype=fs_type,
                flags=bits,
                data=data,
            )
        except OSError as e:
            raise _mount_error(e, f"mounting volume {vol.id}") from e
        if not fresh and fs_type != "ext4" and not bits & syscalls.MS_RDONLY:
            await self._grow_if_smaller(fs_type, dev, real)
        log.info("staged %s (%s, %s) at %s", vol.id, dev.path, fs_type, staging)

    async def _format_if_blank(self, vol: Volume, dev: Device, fs_type: str) -> bool:
        """Format only a device the probe proves blank. Returns True if it did.

        The one exception: when the volume records that *we* started mkfs and
        never finished (a crash or kill in between), whatever is on the device
        is our own half-made filesystem; no user could have written to it, as
        a volume is mounted only after ``formatted`` is recorded. Then mkfs
        runs again with force.
        """
        if vol.formatted == fs_type and await asyncio.to_thread(_superblock_size, dev.path, fs_type) is not None:
            return False  # restage: the superblock we recorded is there (a cheap check; blkid otherwise)
        if not vol.formatted and not vol.formatting and await self.backend.proven_blank(vol.id):
            # Nothing was ever written to it: every byte reads zero, no probe needed.
            await self._mkfs(vol, dev, fs_type)
            log.info("formatted %s as %s", vol.id, fs_type)
            return True
        probe = await self.fs.probe(dev.path)
        interrupted = not vol.formatted and vol.formatting == fs_type
        if probe.blank or interrupted:
            if vol.formatted:
                # The record says we formatted it; a blank read now means something
                # is badly wrong underneath. Formatting would destroy the evidence.
                raise FailedPrecondition(
                    f"volume {vol.id} was formatted with {vol.formatted} but its device reads blank; "
                    "refusing to format it again"
                )
            await self._mkfs(vol, dev, fs_type, force=interrupted and not probe.blank)
            log.info(
                "formatted %s as %s%s", vol.id, fs_type, " (redone after an interrupted mkfs)" if interrupted else ""
            )
            return True
        if probe.fstype != fs_type:
            found = probe.fstype or ", ".join(f"{k}={v}" for k, v in sorted(probe.fields.items())) or "a signature"
            raise FailedPrecondition(
                f"volume {vol.id} holds {found}, not {fs_type}; refusing to format over existing data"
            )
        if vol.formatted != fs_type:
            await self.backend.mark_formatted(vol.id, fs_type)
        return False

    async def _mkfs(self, vol: Volume, dev: Device, fs_type: str, *, force: bool = False) -> None:
        """mkfs between two durable records: the intent before (so a crash in
        between is known to be our own half-made filesystem), the fact after."""
        await self.backend.mark_formatted(vol.id, fs_type, complete=False)
        await self.fs.mkfs(dev.path, fs_type, force=force)
        await self.backend.mark_formatted(vol.id, fs_type)

    @staticmethod
    async def _smaller(fs_type: str, dev: Device) -> bool:
        """True when the filesystem does not fill its device (it was expanded or cloned bigger)."""
        fs_bytes = await asyncio.to_thread(read_fs_size, dev.path, fs_type)
        dev_bytes = await asyncio.to_thread(device_size, dev.path)
        return fs_bytes is not None and fs_bytes < dev_bytes

    async def _grow_if_smaller(self, fs_type: str, dev: Device, mount_point: str) -> None:
        if await self._smaller(fs_type, dev):
            await self.fs.grow(fs_type, dev.path, mount_point)
            log.info("grew %s on %s to fill the device", fs_type, dev.path)

    # -- unstage ------------------------------------------------------------------

    def _users(self, table: MountTable, dev: Device | None, exclude: set[str]) -> list[Mount]:
        if dev is None:
            return []
        found = table.of_device(dev.major, dev.minor) + table.of_device_node(dev.name)
        return [m for m in found if m.mount_point not in exclude]

    async def unstage(self, volume_id: str, staging: str) -> None:
        real = self.guard.real(staging)
        dev = await self.backend.find_device(volume_id)
        table = await self._table()
        users = self._users(table, dev, {real})
        if users:
            raise InUse(f"volume {volume_id} is still published at {users[0].mount_point}; unpublish it first")
        await self._unmount_stack(staging, "staging_target_path", real, table, f"the filesystem at {staging} is busy")
        await self.backend.detach(volume_id)
        log.info("unstaged %s from %s", volume_id, staging)

    # -- publish ------------------------------------------------------------------

    async def publish(self, volume_id: str, staging: str, target: str, cap: Capability, readonly: bool) -> None:
        vol = await self._volume(volume_id)
        self._check_access(vol, cap)
        readonly = readonly or cap.mode == Mode.SINGLE_NODE_READER_ONLY or "ro" in cap.mount_flags
        real_staging, real_target = self.guard.real(staging), self.guard.real(target)
        dev = await self.backend.find_device(volume_id)
        if dev is None:
            raise FailedPrecondition(f"volume {volume_id} is not staged on this node; call NodeStageVolume first")
        table = await self._table()
        block = cap.access == AccessType.BLOCK
        if not block:
            top = table.top(real_staging)
            if top is None or not shows(top, dev, node_bind=False):
                raise FailedPrecondition(f"volume {volume_id} is not staged at {staging}")
        if self._published(table.top(real_target), dev, block, readonly, volume_id, target):
            return
        if cap.mode == Mode.SINGLE_NODE_SINGLE_WRITER:
            others = self._users(table, dev, {real_staging, real_target})
            if others:
                raise FailedPrecondition(
                    f"volume {volume_id} is single-writer (ReadWriteOncePod) and already published at {others[0].mount_point}"
                )
        await asyncio.to_thread(self.guard.make, target, "target_path", want_dir=not block)
        bits = bind_bits(cap.mount_flags, readonly)
        try:
            if block:
                await asyncio.to_thread(self._bind_device, dev, target, bits)
            else:
                await asyncio.to_thread(
                    self.guard.bind, staging, "staging_target_path", target, "target_path", flags=bits
                )
        except OSError as e:
            raise _mount_error(e, f"publishing volume {volume_id}") from e
        log.info("published %s at %s%s", volume_id, target, " (ro)" if readonly else "")

    @staticmethod
    def _published(
        current: Mount | None, dev: Device, block: bool, readonly: bool, volume_id: str, target: str
    ) -> bool:
        """Whether the volume is published at the target already, as asked
        (a repeat); AlreadyExists if something else is, or it is otherwise."""
        if current is None:
            return False
        if not shows(current, dev, node_bind=block):
            raise AlreadyExists(f"something else is already mounted at {target}")
        if current.readonly != readonly:
            raise AlreadyExists(f"volume {volume_id} is already published at {target} with readonly={current.readonly}")
        return True

    def _bind_device(self, dev: Device, target: str, bits: int) -> None:
        self.guard.mount(
            target, "target_path", want_dir=False, source=dev.path, fstype=None, flags=syscalls.MS_BIND, data=None
        )
        if bits:
            self.guard.remount(
                target, "target_path", want_dir=False, flags=syscalls.MS_REMOUNT | syscalls.MS_BIND | bits
            )

    async def _unmount_stack(self, path: str, field: str, real: str, table: MountTable, busy: str) -> None:
        """Unmount ``path`` until nothing is mounted there: mounts may stack
        (a retried mount, a kubelet restart). EBUSY is InUse(``busy``); EINVAL
        (not a mount point any more) is what a repeat finds, and is fine."""
        for _ in range(MAX_STACKED):
            if table.top(real) is None:
                return
            try:
                await asyncio.to_thread(self.guard.umount, path, field)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise InUse(busy) from e
                if e.errno != errno.EINVAL:
                    raise Internal(f"unmounting {path} failed: {e.strerror}") from e
            table = await self._table()
        raise Internal(f"{path} is still a mount point after {MAX_STACKED} unmounts; check the mount table")

    # -- unpublish ----------------------------------------------------------------

    async def unpublish(self, volume_id: str, target: str) -> None:
        real = self.guard.real(target)
        if await asyncio.to_thread(self.guard.lstat, target, "target_path") is None:
            return  # already gone: kubelet retries teardown forever on any error
        await self._unmount_stack(target, "target_path", real, await self._table(), f"the mount at {target} is busy")
        await asyncio.to_thread(self.guard.remove, target, "target_path")
        log.info("unpublished %s from %s", volume_id, target)

    # -- stats and expansion ------------------------------------------------------

    async def _where(self, volume_id: str, path: str) -> tuple[Volume, Device, Mount]:
        vol = await self._volume(volume_id)
        try:
            real = self.guard.real(path)
        except InvalidArgument as e:
            raise NotFound(f"volume {volume_id} is not available at {path!r}") from e
        dev = await self.backend.find_device(volume_id)
        table = await self._table()
        top = table.top(real)
        if dev is None or top is None:
            raise NotFound(f"volume {volume_id} is not staged or published at {path}")
        if not shows(top, dev, node_bind=True):
            raise NotFound(f"volume {volume_id} is not mounted at {path}")
        return vol, dev, top

    async def stats(self, volume_id: str, path: str) -> Stats:
        vol, dev, top = await self._where(volume_id, path)
        health = await self.backend.health(volume_id)
        if top.fstype == "devtmpfs" or vol.access == AccessType.BLOCK:
            size = await asyncio.to_thread(device_size, dev.path)
            return Stats(True, size, 0, 0, 0, 0, 0, health)
        st = await asyncio.to_thread(os.statvfs, top.mount_point)
        total = st.f_blocks * st.f_frsize
        avail = st.f_bavail * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        return Stats(False, total, avail, used, st.f_files, st.f_ffree, st.f_files - st.f_ffree, health)

    async def expand(self, volume_id: str, path: str, required: int) -> int:
        """Grow the volume (if asked for more than it has), its device, then its
        filesystem. Growing the volume here serves node-only expansion (see
        ``elv serve --node-expansion-only``): the volume lives on this node, so
        the node is where it can grow."""
        vol, dev, top = await self._where(volume_id, path)
        if required > vol.size:
            want = round_up(required, self.backend.granularity)
            vol = await self.backend.expand_volume(volume_id, want)
        size = await self.backend.refresh_device(volume_id)
        if required and size < required:
            raise OutOfRange(f"the device shows {size} bytes after growing to {vol.size}; retry")
        if vol.access == AccessType.MOUNT and top.fstype != "devtmpfs":
            fs_type = vol.formatted or vol.fs_type or DEFAULT_FS
            await self._grow_if_smaller(fs_type, dev, top.mount_point)
        return size
