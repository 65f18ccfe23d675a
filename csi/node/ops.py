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
from dataclasses import dataclass, field

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
from csi.node.mounts import STAGED, bind_bits, mount_options, shows, shows_any, stage_marker, users
from csi.node.views import Views

log = logging.getLogger(__name__)

#: Unmount at most this many stacked mounts at one path; a path that stays a
#: mount point after that (umount says EINVAL but mountinfo lists it, e.g. a
#: mount hidden under another) is reported instead of retried forever.
MAX_STACKED = 16


@dataclass
class _Work:
    """What one stage or publish made, so a failure undoes exactly that."""

    #: Set once the call has checked that the path holds nothing of the
    #: volume's: from then on, a mount of the volume's there is this call's.
    began: bool = False
    #: Paths it created (parents first).
    created: list[str] = field(default_factory=list)
    #: Read-only views it made.
    views: list[Device] = field(default_factory=list)


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
    def __init__(self, backend: NodeBackend, guard: PathGuard, fs: FsTool, views: Views) -> None:
        self.backend = backend
        self.guard = guard
        self.fs = fs
        self.views = views

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
        work = _Work()
        try:
            if fs_type is None:
                await self._stage_block(vol, dev, staging, real, work)
            else:
                await self._stage_mount(vol, dev, fs_type, staging, real, cap, work)
        except BaseException:
            # The marker (raw block) or the staging path itself (a filesystem).
            at, real_at = (
                (os.path.join(staging, STAGED), os.path.join(real, STAGED)) if fs_type is None else (staging, real)
            )
            await self._undo(work, at, "staging_target_path", real_at, [dev])
            # Leave no loop device behind for a stage that did not happen.
            if not was_attached and not users(await self._table(), [dev], set()):
                await self.backend.detach(volume_id)
            raise

    async def _stage_block(self, vol: Volume, dev: Device, staging: str, real: str, work: _Work) -> None:
        """Bind the device node onto STAGED in the staging directory (see there)."""
        marker, real_marker = os.path.join(staging, STAGED), os.path.join(real, STAGED)
        table = await self._table()
        top = table.top(real_marker)
        rdev = await asyncio.to_thread(self.guard.device, marker, "staging_target_path")
        if top is not None and stage_marker(top, dev, rdev):
            return  # a repeat
        elsewhere = [m for m in table.of_device_node(dev.name) if stage_marker(m, dev)]
        if elsewhere:
            raise FailedPrecondition(
                f"volume {vol.id} is already staged at {os.path.dirname(elsewhere[0].mount_point)} on this node; "
                "a volume is staged at one path at a time: unstage it there first"
            )
        if top is not None or table.top(real) is not None:
            raise AlreadyExists(f"something else is already mounted at {staging}")
        work.began = True
        await asyncio.to_thread(self.guard.make, staging, "staging_target_path", want_dir=True, created=work.created)
        await asyncio.to_thread(self.guard.make, marker, "staging_target_path", want_dir=False, created=work.created)
        try:
            await asyncio.to_thread(
                self.guard.mount,
                marker,
                "staging_target_path",
                want_dir=False,
                source=dev.path,
                fstype=None,
                flags=syscalls.MS_BIND,
                data=None,
            )
        except OSError as e:
            raise _mount_error(e, f"staging volume {vol.id}") from e
        log.info("staged %s (%s, raw block) at %s", vol.id, dev.path, staging)

    async def _stage_mount(
        self, vol: Volume, dev: Device, fs_type: str, staging: str, real: str, cap: Capability, work: _Work
    ) -> None:
        table = await self._table()
        top = table.top(real)
        if top is not None and shows(top, dev, node_bind=False):
            if cap.mount_flags and ("ro" in cap.mount_flags) != top.readonly:
                raise AlreadyExists(f"volume {vol.id} is staged at {staging} with other mount flags")
            return
        elsewhere = users(table, [dev], {real})
        if elsewhere:
            # The CO promises one staging path per volume; a second one would be a
            # second mount that every later unstage counts as a user, for ever.
            raise FailedPrecondition(
                f"volume {vol.id} is already staged or published at {elsewhere[0].mount_point} on this node; "
                "a volume is staged at one path at a time: unstage it there first"
            )
        if top is not None:
            raise AlreadyExists(f"another device is already mounted at {staging}")
        work.began = True
        await asyncio.to_thread(self.guard.make, staging, "staging_target_path", want_dir=True, created=work.created)
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

    # -- what is the volume's -------------------------------------------------------

    async def _devices(self, dev: Device | None) -> list[Device]:
        """The volume's device and its read-only views: what its mounts show."""
        if dev is None:
            return []
        return [dev, *await self.views.of(dev)]

    async def _peel(self, path: str, field: str, real: str, devs: list[Device], busy: str) -> tuple[bool, bool]:
        """Unmount the volume's own mounts from the top of the stack at ``path``,
        one at a time, re-reading the table before each: mounts may stack (a
        retried mount, a kubelet restart). Stops at the first mount that is not
        the volume's, and never unmounts it. Returns (unmounted anything,
        something else is still mounted there).

        FailedPrecondition when a mount of the volume's lies under a foreign
        one: ours cannot be undone without undoing theirs. EBUSY is InUse
        (``busy``); EINVAL (gone meanwhile) is re-read."""
        peeled = False
        for _ in range(MAX_STACKED):
            stack = (await self._table()).stack(real)
            if not stack:
                return peeled, False
            rdev = await asyncio.to_thread(self.guard.device, path, field) if devs else None
            if not devs or not shows_any(stack[0], devs, rdev):
                if any(shows_any(m, devs) for m in stack[1:]):
                    raise FailedPrecondition(
                        f"something else is mounted at {path} over the volume's own mount; unmount it first"
                    )
                return peeled, True
            try:
                await asyncio.to_thread(self.guard.umount, path, field)
                peeled = True
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise InUse(busy) from e
                if e.errno != errno.EINVAL:
                    raise Internal(f"unmounting {path} failed: {e.strerror}") from e
        raise Internal(f"{path} is still a mount point after {MAX_STACKED} unmounts; check the mount table")

    async def _drop_unused_views(self, dev: Device) -> None:
        """Remove the read-only views of the device that nothing binds any more
        (the last read-only publish went, or a killed publish left one)."""
        views = await self.views.of(dev)
        if not views:
            return
        table = await self._table()
        for view in views:
            if not users(table, [view], set()):
                await self.views.drop(view)

    async def _undo(self, work: _Work, path: str, field: str, real: str, devs: list[Device]) -> None:
        """Undo what a failed stage or publish made at ``path``, and only that:
        the path held nothing of the volume's when the call began its work, so
        a mount of the volume's on top of it now is this call's. Logged, never
        raised: the call's own error is the answer."""
        if not work.began:
            return
        try:
            await self._peel(path, field, real, [*devs, *work.views], f"{path} is busy")
            for view in work.views:
                if not users(await self._table(), [view], set()):
                    await self.views.drop(view)
            for made in reversed(work.created):
                await asyncio.to_thread(self.guard.remove, made, field)
        except Exception:
            log.exception("could not undo all a failed call made at %s", path)

    # -- unstage ------------------------------------------------------------------

    async def unstage(self, volume_id: str, staging: str) -> None:
        """Undo the volume's stage at ``staging``. The volume not staged there is
        success, and then nothing is touched: not what is mounted there (another
        volume's, or not ELV's at all), nor the volume's stage elsewhere."""
        real = self.guard.real(staging)
        dev = await self.backend.find_device(volume_id)
        if dev is None:
            # Not attached: nothing at the path, or anywhere, is the volume's; but
            # a raw block stage's marker file outlives its mount across a reboot.
            await self._remove_stale_marker(volume_id, os.path.join(staging, STAGED))
            return
        devs = await self._devices(dev)
        table = await self._table()
        real_marker = os.path.join(real, STAGED)
        marker = table.top(real_marker)
        rdev = await asyncio.to_thread(self.guard.device, os.path.join(staging, STAGED), "staging_target_path")
        if marker is not None and stage_marker(marker, dev, rdev):
            await self._unstage_here(volume_id, os.path.join(staging, STAGED), real_marker, devs, table)
        elif any(stage_marker(m, dev) for m in table.stack(real_marker)[1:]):
            raise FailedPrecondition(
                f"something else is mounted at {staging} over volume {volume_id}'s stage; unmount it first"
            )
        elif not await self._unstage_mount(volume_id, staging, real, devs, table):
            return
        # The marker file (a raw block stage's, or one a killed stage made and
        # never mounted on): removed only while empty, as everything is.
        marker_path = os.path.join(staging, STAGED)
        if await asyncio.to_thread(self.guard.lstat, marker_path, "staging_target_path") is not None:
            await asyncio.to_thread(self.guard.remove, marker_path, "staging_target_path")
        # Attached and mounted nowhere now. That is also a raw block stage of an
        # older driver (no marker), or what a failed or killed stage left:
        # either way the device is the volume's, and nothing uses it.
        await self._drop_unused_views(dev)
        await self.backend.detach(volume_id)
        log.info("unstaged %s from %s", volume_id, staging)

    async def _remove_stale_marker(self, volume_id: str, marker: str) -> None:
        st = await asyncio.to_thread(self.guard.lstat, marker, "staging_target_path")
        if st is not None and await self.backend.get_volume(volume_id) is not None:
            await asyncio.to_thread(self.guard.remove, marker, "staging_target_path")

    async def _unstage_here(self, volume_id: str, path: str, real: str, devs: list[Device], table: MountTable) -> None:
        """Unmount the volume's stage at ``path``: InUse while it is published."""
        published = users(table, devs, {real})
        if published:
            raise InUse(f"volume {volume_id} is still published at {published[0].mount_point}; unpublish it first")
        await self._peel(path, "staging_target_path", real, devs, f"the filesystem at {path} is busy")

    async def _unstage_mount(
        self, volume_id: str, staging: str, real: str, devs: list[Device], table: MountTable
    ) -> bool:
        """Unstage a filesystem stage at ``staging``; False when the volume is
        staged elsewhere, not here (then nothing is touched)."""
        dev, stack = devs[0], table.stack(real)
        if stack and shows_any(stack[0], devs):
            await self._unstage_here(volume_id, staging, real, devs, table)
            return True
        if any(shows_any(m, devs) for m in stack[1:]):
            raise FailedPrecondition(
                f"something else is mounted at {staging} over volume {volume_id}'s stage; unmount it first"
            )
        elsewhere = users(table, devs, {real})
        staged = [m for m in elsewhere if (m.major, m.minor) == (dev.major, dev.minor) or stage_marker(m, dev)]
        if staged:
            log.info(
                "volume %s is not staged at %s (it is at %s): nothing to do", volume_id, staging, staged[0].mount_point
            )
            return False
        if elsewhere:
            raise InUse(f"volume {volume_id} is still published at {elsewhere[0].mount_point}; unpublish it first")
        return True

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
        devs = await self._devices(dev) if block else [dev]
        if await self._published(table.top(real_target), devs, block, readonly, volume_id, target):
            return
        if cap.mode == Mode.SINGLE_NODE_SINGLE_WRITER:
            others = [m for m in users(table, devs, {real_staging, real_target}) if not stage_marker(m, dev)]
            if others:
                raise FailedPrecondition(
                    f"volume {volume_id} is single-writer (ReadWriteOncePod) and already published at {others[0].mount_point}"
                )
        bits = bind_bits(cap.mount_flags, readonly)
        work = _Work(began=True)
        try:
            await asyncio.to_thread(self.guard.make, target, "target_path", want_dir=not block, created=work.created)
            if block:
                await self._bind_device(dev, target, bits, readonly, work)
            else:
                await asyncio.to_thread(
                    self.guard.bind, staging, "staging_target_path", target, "target_path", flags=bits
                )
        except BaseException as e:
            # Nothing of the volume's was at the target when this call began.
            await self._undo(work, target, "target_path", real_target, devs)
            if isinstance(e, OSError):
                raise _mount_error(e, f"publishing volume {volume_id}") from e
            raise
        log.info("published %s at %s%s", volume_id, target, " (ro)" if readonly else "")

    async def _published(
        self, current: Mount | None, devs: list[Device], block: bool, readonly: bool, volume_id: str, target: str
    ) -> bool:
        """Whether the volume is published at the target already, as asked
        (a repeat); AlreadyExists if something else is, or it is otherwise."""
        if current is None:
            return False
        rdev = await asyncio.to_thread(self.guard.device, target, "target_path") if block else None
        if not shows_any(current, devs, rdev):
            raise AlreadyExists(f"something else is already mounted at {target}")
        # A raw block publish is read-only when it binds a read-only view (the
        # mount's own flag does not stop writes to a device node).
        is_ro = shows_any(current, devs[1:], rdev) if block else current.readonly
        if is_ro != readonly:
            raise AlreadyExists(f"volume {volume_id} is already published at {target} with readonly={is_ro}")
        return True

    async def _bind_device(self, dev: Device, target: str, bits: int, readonly: bool, work: _Work) -> None:
        source = dev
        if readonly:
            source, made = await self.views.get(dev)
            if made:
                work.views.append(source)
        await asyncio.to_thread(
            self.guard.mount,
            target,
            "target_path",
            want_dir=False,
            source=source.path,
            fstype=None,
            flags=syscalls.MS_BIND,
            data=None,
        )
        if bits:
            # The target now shows the device node, no longer a regular file.
            await asyncio.to_thread(
                self.guard.remount,
                target,
                "target_path",
                want_dir=None,
                flags=syscalls.MS_REMOUNT | syscalls.MS_BIND | bits,
            )

    # -- unpublish ----------------------------------------------------------------

    async def unpublish(self, volume_id: str, target: str) -> None:
        """Undo the volume's publish at ``target``: unmount its own mounts there,
        then remove the target if it holds nothing. Not published there is
        success, and then nothing is touched: another volume's mount, a mount
        ELV did not make, a path holding data."""
        real = self.guard.real(target)
        if await asyncio.to_thread(self.guard.lstat, target, "target_path") is None:
            return  # already gone: kubelet retries teardown forever on any error
        dev = await self.backend.find_device(volume_id)
        devs = await self._devices(dev)
        peeled, covered = await self._peel(target, "target_path", real, devs, f"the mount at {target} is busy")
        if dev is not None:
            await self._drop_unused_views(dev)
        if covered:
            log.info("left %s as it is: what is mounted there is not volume %s's", target, volume_id)
            return
        if not peeled and await self.backend.get_volume(volume_id) is None:
            return  # not one of this driver's volumes: nothing here is ours to remove
        if not await asyncio.to_thread(self.guard.remove, target, "target_path"):
            log.warning("kept %s: it is not empty, so it is not only volume %s's", target, volume_id)
            return
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
        rdev = await asyncio.to_thread(self.guard.device, path, "volume_path")
        if not shows_any(top, await self._devices(dev), rdev):
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
        await self.views.refresh(dev)
        if required and size < required:
            raise OutOfRange(f"the device shows {size} bytes after growing to {vol.size}; retry")
        if vol.access == AccessType.MOUNT and top.fstype != "devtmpfs":
            fs_type = vol.formatted or vol.fs_type or DEFAULT_FS
            if await self._smaller(fs_type, dev):
                await self.fs.grow(fs_type, dev.path, await self._writable_mount(volume_id, dev))
                log.info("grew %s on %s to fill the device", fs_type, dev.path)
        return size

    async def _writable_mount(self, volume_id: str, dev: Device) -> str:
        """Where the volume's own device is mounted read-write (its staging
        path): a filesystem grows only through such a mount. The path asked
        about may be a read-only publish, which shows a read-only view of the
        device, or a read-only bind."""
        for m in (await self._table()).of_device(dev.major, dev.minor):
            if not m.readonly and "ro" not in m.super_options:
                return m.mount_point
        raise FailedPrecondition(
            f"volume {volume_id} is mounted only read-only on this node, so its filesystem cannot grow now; "
            "it grows when it is next staged read-write"
        )
