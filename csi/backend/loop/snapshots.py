"""Snapshots and group snapshots of loop volumes.

A snapshot is a read-only copy of the volume's image: a reflink where the
pool filesystem can share blocks (xfs, btrfs), a sparse copy elsewhere
(``cp --reflink=auto --sparse=always``). The filesystem of a staged volume
is frozen around the copy so the snapshot is crash-consistent; a group
snapshot freezes all its members together, so they share one point in time,
and exists once its record, written after all its members, does
(create_group). Clones of a volume copy under the same freeze (the
backend's _copy_point_in_time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from csi.backend import freeze
from csi.backend.base import member_name
from csi.backend.loop import files
from csi.backend.loop.alloc import Allocation
from csi.backend.loop.store import Store
from csi.errors import AlreadyExists, NotFound
from csi.host import loop as loopdev
from csi.host.fs import FsTool
from csi.host.mountinfo import MountTable
from csi.model import AccessType, GroupSnapshot, Snapshot, Volume, ids

log = logging.getLogger(__name__)

Copier = Callable[[str, str, int], Awaitable[None]]
Reserver = Callable[[int, str], contextlib.AbstractAsyncContextManager[None]]


class LoopSnapshots:
    def __init__(
        self, store: Store, pool: str, fs: FsTool, copy: Copier, reserve: Reserver, sys_block: str, alloc: Allocation
    ) -> None:
        self._alloc = alloc
        self.store = store
        self.pool = pool
        self._fs = fs
        self._copy = copy
        self._reserve = reserve
        self._sys_block = sys_block

    def _sid(self, snapshot_id: str) -> ids.ObjectId | None:
        oid = ids.parse(snapshot_id, "s")
        return oid if oid is not None and oid.pool == self.pool else None

    def _vid(self, volume_id: str) -> ids.ObjectId | None:
        oid = ids.parse(volume_id, "v")
        return oid if oid is not None and oid.pool == self.pool else None

    def _visible(self, snap: Snapshot) -> bool:
        """A group's member exists once its group's record does (see create_group)."""
        return snap.group_id is None or snap.group_id in self.store.groups

    async def get(self, snapshot_id: str) -> Snapshot | None:
        snap = self.store.snapshots.get(snapshot_id) if self._sid(snapshot_id) else None
        return snap if snap is not None and self._visible(snap) else None

    async def all(self) -> list[Snapshot]:
        return [self.store.snapshots[k] for k in sorted(self.store.snapshots) if self._visible(self.store.snapshots[k])]

    async def create(self, name: str, source_volume_id: str) -> Snapshot:
        existing = self.store.snapshot_named(name)
        sid = self._sid(existing.id) if existing else None
        sid = sid or self.store.fresh("s", self.pool, name)
        return (await self.take([(sid, name, source_volume_id)], None))[0]

    async def take(self, members: list[tuple[ids.ObjectId, str, str]], group_id: str | None) -> list[Snapshot]:
        """Snapshot each (snapshot ID, name, volume ID) at one point in time;
        existing snapshots of that ID and source are returned as they are."""
        todo: list[tuple[ids.ObjectId, str, Volume]] = []
        done: dict[str, Snapshot] = {}
        for sid, name, vid_s in members:
            existing = self.store.snapshots.get(str(sid))
            if existing is not None:
                if existing.source_volume_id != vid_s:
                    raise AlreadyExists(f"snapshot {name!r} already exists for another volume")
                done[name] = existing
                continue
            vol = self.store.volumes.get(vid_s) if self._vid(vid_s) else None
            if vol is None:
                raise NotFound(f"source volume {vid_s} does not exist")
            todo.append((sid, name, vol))
        if todo:
            await self._take(todo, group_id, done)
        return [done[name] for _, name, _ in members]

    async def _take(
        self, todo: list[tuple[ids.ObjectId, str, Volume]], group_id: str | None, done: dict[str, Snapshot]
    ) -> None:
        """Copy the sources frozen together, then commit each copy. A failure
        anywhere removes every copy this call made, committed or not: a group
        is never left with some of its members."""
        # A copy needs what its source has allocated (holes stay holes).
        need = 0
        for _, _, vol in todo:
            need += (await asyncio.to_thread(os.stat, self._image(vol))).st_blocks * 512
        try:
            async with self._reserve(need, "snapshots"):
                async with self.frozen([v for _, _, v in todo]):
                    for sid, _, vol in todo:
                        # Straight to the final name: without metadata it is garbage, not a snapshot.
                        await self._copy(self._image(vol), self.store.snapshot_image(sid), vol.size)
                for sid, name, vol in todo:
                    done[name] = await self._commit(sid, name, vol, group_id)
        except BaseException:
            for sid, _, _ in todo:
                await self.delete(str(sid))
            raise

    def _image(self, vol: Volume) -> str:
        vid = self._vid(vol.id)
        assert vid is not None
        return self.store.volume_image(vid)

    async def _commit(self, sid: ids.ObjectId, name: str, vol: Volume, group_id: str | None) -> Snapshot:
        try:
            await asyncio.to_thread(files.sync_file, self.store.snapshot_image(sid))
            snap = Snapshot(
                id=str(sid),
                name=name,
                source_volume_id=vol.id,
                size=vol.size,
                created_ns=time.time_ns(),
                group_id=group_id,
                access=vol.access,
                fs_type=vol.formatted,  # what is really on the copied data
                block_size=vol.block_size,
            )
            await self.store.put_snapshot(snap)
            await self._alloc.track(self.store.snapshot_image(sid))
        except BaseException:
            await asyncio.to_thread(files.discard, self.store.snapshot_image(sid))
            raise
        log.info("created snapshot %s of %s", snap.id, vol.id)
        return snap

    @contextlib.asynccontextmanager
    async def frozen(self, volumes: list[Volume]) -> AsyncIterator[None]:
        """Freeze the mounted filesystems of these volumes for the duration.

        A marker in tmp/ names each mount point before it is frozen, so a crash
        mid-copy is thawed at the next start instead of hanging every writer.
        """
        table = await asyncio.to_thread(MountTable.load)
        points: list[str] = []
        for vol in volumes:
            if vol.access != AccessType.MOUNT:
                continue  # raw block has no filesystem to freeze
            for dev in loopdev.find(self._image(vol), self._sys_block):  # a full scan: rare, and must not miss
                maj, mnr = loopdev.device_numbers(dev.name)
                mounts = table.of_device(maj, mnr)
                if mounts:
                    points.append(mounts[0].mount_point)
        async with freeze.frozen(self._fs, points, self.store.tmp_dir, "freeze"):
            yield

    async def thaw_leftovers(self) -> None:
        """Thaw what an interrupted snapshot or clone left frozen (see frozen)."""
        await freeze.thaw_leftovers(self._fs, self.store.tmp_dir)

    async def delete(self, snapshot_id: str) -> None:
        sid = self._sid(snapshot_id)
        if sid is not None:
            await self.store.drop_snapshot(sid)
            self._alloc.forget(self.store.snapshot_image(sid))

    # -- groups -------------------------------------------------------------------

    def _group(self, record: dict[str, Any]) -> GroupSnapshot:
        snaps = tuple(self.store.snapshots[s] for s in record["snapshots"] if s in self.store.snapshots)
        return GroupSnapshot(record["id"], record["name"], snaps, int(record["created_ns"]))

    async def create_group(self, name: str, volume_ids: list[str]) -> GroupSnapshot:
        """Snapshot the members frozen together, then write the group's record.

        **The record is the group's commit point**, as a volume's metadata
        is the volume's: it is written only after every member snapshot is
        committed, and removed before them on delete. Until then the members
        are invisible (get, all), a failure removes them, and startup
        removes the members of a group without a record (Store.open). So a
        failed or killed create leaves nothing, and its name stays free.
        """
        members = sorted(set(volume_ids))
        existing = self.store.group_named(name)
        gid = ids.parse(existing["id"], "g") if existing else None
        gid = gid or self.store.fresh("g", self.pool, name)
        if existing is not None:
            if existing["volumes"] != members:
                raise AlreadyExists(f"group snapshot {name!r} already exists with other volumes")
            return self._group(existing)
        for v in members:
            if self.store.volumes.get(v) is None or self._vid(v) is None:
                raise NotFound(f"source volume {v} does not exist")
        # Fresh IDs for every member: members an earlier attempt left (were its
        # cleanup to fail) are from another instant and are never reused.
        todo = [(self.store.fresh("s", self.pool, n), n, v) for n, v in ((member_name(name, v), v) for v in members)]
        try:
            snaps = await self.take(todo, str(gid))
            record = {
                "id": str(gid),
                "name": name,
                "volumes": members,
                "snapshots": [s.id for s in snaps],
                "created_ns": time.time_ns(),
            }
            await self.store.put_group(gid, record)
        except BaseException:
            await self._drop_members(str(gid))
            raise
        return self._group(record)

    async def _drop_members(self, group_id: str) -> None:
        for snap in [s for s in self.store.snapshots.values() if s.group_id == group_id]:
            await self.delete(snap.id)

    async def get_group(self, group_id: str) -> GroupSnapshot | None:
        oid = ids.parse(group_id, "g")
        if oid is None or oid.pool != self.pool:
            return None
        record = self.store.groups.get(group_id)
        return self._group(record) if record else None

    async def delete_group(self, group_id: str) -> None:
        oid = ids.parse(group_id, "g")
        if oid is None or oid.pool != self.pool:
            return
        record = self.store.groups.get(group_id)
        # The record first (the commit point): a crash or a failure after it
        # leaves members without a group, which a retry or startup removes.
        await self.store.drop_group(oid)
        for sid in record["snapshots"] if record is not None else []:
            await self.delete(sid)
        await self._drop_members(group_id)
