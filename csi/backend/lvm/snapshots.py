"""Snapshots and group snapshots of LVM volumes.

* A thin volume's snapshot is a thin snapshot: instant, sharing blocks with
  its origin. It carries LVM's activation-skip flag so nothing activates it
  by accident.
* A thick volume's snapshot is a classic copy-on-write snapshot whose store
  gets ``elv.csi.dev/lvm-snapshot-reserve`` percent of the origin (a
  parameter of the source's StorageClass: CSI gives snapshot classes no
  sizing key). The default, 100 %, can never overflow; a smaller store that
  fills up invalidates the snapshot (it is then reported not ready).

LVM suspends the origin with its filesystem frozen while it takes a
snapshot, so a single snapshot is consistent by itself. A group snapshot
freezes every member's filesystem first (fsfreeze, with crash markers), then
takes one ``lvcreate -s`` per member, then thaws them all. Its members are
made ``elv.pending`` and let go together once all exist: a group is whole
or absent, after a failure and after a crash (create_group). LVM's own freeze
fails on a filesystem that fsfreeze holds (EBUSY on the 6.1 kernel), so each
member is let go for just the moment of its own snapshot, while LVM holds it
frozen instead: members are captured one after another, each while every
other member is frozen, which is close to, but not exactly, one instant.
Snapshot metadata (name, source, size, time, group) lives in the snapshot
LV's tags.
"""

from __future__ import annotations

import logging
import math
import time

from csi.backend import freeze
from csi.backend.base import member_name
from csi.backend.lvm import model, params
from csi.backend.lvm.inventory import View
from csi.backend.lvm.report import LvInfo, classify, hex_decode, hex_encode, not_found
from csi.backend.lvm.store import LvStore
from csi.backend.lvm.wipe import Wiper
from csi.errors import AlreadyExists, CommandError, NotFound
from csi.model import GroupSnapshot, Snapshot, Volume, ids, round_up

log = logging.getLogger(__name__)
#: A snapshot still to take: its ID, its name, the source LV and volume.
_Member = tuple[ids.ObjectId, str, LvInfo, Volume]


def cow_size(origin: int, percent: int, extent: int) -> int:
    """A COW store for ``percent`` of the origin, plus room for the exception
    table (16 bytes per 4 KiB chunk, about 1/256) and a spare extent. LVM trims
    a store larger than the origin can ever need."""
    data = math.ceil(origin * percent / 100)
    return round_up(data + origin // 128 + extent, extent)


class LvmSnapshots:
    def __init__(self, store: LvStore, wiper: Wiper) -> None:
        self.store = store
        self.wiper = wiper

    def _snapshots(self, view: View) -> list[Snapshot]:
        out = []
        for lv in view.all():
            oid = model.parse_lv_name(lv.name)
            if oid and oid.kind == "s" and self.store.class_of(lv) and model.live(lv, self.store.owner, "s"):
                out.append(model.to_snapshot(lv, str(oid)))
        return sorted(out, key=lambda s: s.id)

    async def get(self, snapshot_id: str) -> Snapshot | None:
        found = await self.store.find(snapshot_id, "s")
        return model.to_snapshot(found[1], snapshot_id) if found else None

    async def all(self) -> list[Snapshot]:
        return self._snapshots(await self.store.view())

    async def create(self, name: str, source_volume_id: str) -> Snapshot:
        return (await self._create([(name, source_volume_id)], None))[0]

    async def _create(self, pairs: list[tuple[str, str]], group: tuple[str, str, int] | None) -> list[Snapshot]:
        view = await self.store.view(fresh=True)
        done: dict[str, Snapshot] = {}
        todo: list[_Member] = []
        for name, vid in pairs:
            found = await self._existing_or_todo(view, name, vid)
            if isinstance(found, Snapshot):
                done[name] = found
            else:
                todo.append(found)
        if todo:
            # Per member: its mount point, or "" (not mounted, or not a group).
            points = await self._mount_points(todo) if group is not None else [""] * len(todo)
            async with freeze.frozen(
                self.store.fs, [mp for mp in points if mp], self.store.settings.freeze_dir, "lvm-group"
            ):
                for (sid, name, src, vol), mp in zip(todo, points, strict=True):
                    done[name] = await self._take_thawed(sid, name, src, vol, group, mp)
        return [done[name] for name, _ in pairs]

    async def _existing_or_todo(self, view: View, name: str, vid: str) -> Snapshot | _Member:
        """The snapshot of this name if it is done already, or what taking it needs."""
        parsed = self.store.oid(vid, "v")
        if parsed is None:
            raise NotFound(f"source volume {vid} does not exist")
        cls, void = parsed
        for lv in self.store.named(view, "s", name):  # found by its name tag (LvStore.named)
            sid = model.parse_lv_name(lv.name)
            if lv.has(model.PENDING) or sid is None:
                await self.wiper.quarantine(lv, rename=False)
            elif lv.tag(model.SOURCE) != vid:
                raise AlreadyExists(f"snapshot {name!r} already exists for another volume")
            else:
                return model.to_snapshot(lv, str(sid))
        src = view.lv(cls.vg, model.lv_name(void))
        if src is None or not model.live(src, self.store.owner, "v"):
            raise NotFound(f"source volume {vid} does not exist")
        return self.store.fresh(view, cls, "s", name), name, src, model.to_volume(src, vid)

    async def _mount_points(self, todo: list[_Member]) -> list[str]:
        points = []
        for _, _, src, _ in todo:
            mounts = await self.store.mounts_of(src)
            points.append(mounts[0].mount_point if mounts else "")
        return points

    async def _take_thawed(
        self, sid: ids.ObjectId, name: str, src: LvInfo, vol: Volume, group: tuple[str, str, int] | None, mp: str
    ) -> Snapshot:
        """Snapshot one member of a frozen group. LVM freezes the origin's
        filesystem itself while it snapshots, and the 6.1 kernel refuses that
        freeze (EBUSY) on a filesystem fsfreeze already holds; so this member
        alone is thawed for the moment of its own snapshot, during which LVM
        holds it frozen, and frozen again at once. Every other member stays
        frozen throughout."""
        if not mp:
            return await self._take(sid, name, src, vol, group)
        await self.store.fs.thaw(mp)
        try:
            return await self._take(sid, name, src, vol, group)
        finally:
            await self.store.fs.freeze(mp)

    async def _take(
        self, sid: ids.ObjectId, name: str, src: LvInfo, vol: Volume, group: tuple[str, str, int] | None
    ) -> Snapshot:
        cls = self.store.settings.classes[sid.pool]
        created = time.time_ns()
        # A group's members stay pending until all exist (see create_group).
        tags = model.snapshot_tags(self.store.owner, name, vol, created, group, pending=group is not None)
        lvname = model.lv_name(sid)
        what = f"snapshot {name!r} of {vol.id}"
        try:
            if src.thin:
                # A thin snapshot promises its origin's size again (capacity.py explains why).
                async with self.store.reserve(cls, src.size, what):
                    await self.store.lvm.change(
                        "lvcreate",
                        "-s",
                        "-n",
                        lvname,
                        "--setactivationskip",
                        "y",
                        "-y",
                        *model.addtags(tags),
                        f"{src.vg}/{src.name}",
                    )
            else:
                view = await self.store.view(fresh=True)
                reserve = params.layout(vol.parameters, cls).snapshot_reserve
                size = cow_size(src.size, reserve, self.store.extent(view, cls))
                await self.store.lvm.change(
                    "lvcreate", "-s", "-n", lvname, "-L", f"{size}b", "-y", *model.addtags(tags), f"{src.vg}/{src.name}"
                )
        except CommandError as e:
            raise classify(e, what) from e
        finally:
            self.store.inv.invalidate()
        log.info("created snapshot %s of %s (%s)", sid, vol.id, "thin" if src.thin else "copy-on-write")
        # The tags are exactly what ListSnapshots will read back.
        return Snapshot(
            str(sid),
            name,
            vol.id,
            vol.size,
            created,
            True,
            group[0] if group else None,
            vol.access,
            vol.formatted or vol.fs_type,
        )

    async def delete(self, snapshot_id: str) -> None:
        found = await self.store.find_owned(snapshot_id, "s")
        if found is None:
            return
        lv, view = found
        await self._remove(view, lv)
        log.info("deleted snapshot %s", snapshot_id)

    async def _remove(self, view: View, lv: LvInfo) -> None:
        if self.store.wipe_needed(view, lv):
            await self.wiper.quarantine(lv, rename=False)
            return
        try:
            await self.store.lvm.change("lvremove", "-y", f"{lv.vg}/{lv.name}")
        except CommandError as e:
            if not not_found(e):
                raise
        finally:
            self.store.inv.invalidate()
        self.wiper.kick()  # a deleted thick origin may have been waiting for this

    # -- groups ---------------------------------------------------------------------------

    def _members(self, view: View, group_id: str) -> list[tuple[LvInfo, Snapshot]]:
        out = []
        for lv in view.all():
            oid = model.parse_lv_name(lv.name)
            if oid and oid.kind == "s" and model.live(lv, self.store.owner, "s") and lv.tag(model.GROUP) == group_id:
                out.append((lv, model.to_snapshot(lv, str(oid))))
        return out

    def _group(self, group_id: str, members: list[tuple[LvInfo, Snapshot]]) -> GroupSnapshot:
        name = hex_decode(members[0][0].tag(model.GROUP_NAME) or "") or ""
        snaps = tuple(sorted((s for _, s in members), key=lambda s: s.id))
        return GroupSnapshot(group_id, name, snaps, min(s.created_ns for s in snaps))

    def _group_id(self, view: View, name: str) -> str:
        """The ID of the group called ``name`` (its members' tags say), or a new
        one. A group's ID names the default class: its members may live in several."""
        want = hex_encode(name)
        for lv in view.all():
            if lv.tag(model.GROUP_NAME) == want and lv.tag(model.GROUP) and model.live(lv, self.store.owner, "s"):
                return lv.tag(model.GROUP) or ""
        while True:
            gid = str(ids.new("g", self.store.settings.default, name))
            if not self._members(view, gid):
                return gid

    async def create_group(self, name: str, volume_ids: list[str]) -> GroupSnapshot:
        """Snapshot the members frozen together; the group exists once all do.

        Each member is made ``elv.pending`` (invisible: not live), and one
        lvchange lets them all go once the last exists. A failure anywhere
        removes every member made; startup removes every member of a group
        that still has a pending one (recovery.py). So a failed or killed
        create leaves no group and no member, and a group is never finished
        piecemeal (its members would not share one instant).
        """
        members = sorted(set(volume_ids))
        view = await self.store.view(fresh=True)
        gid = self._group_id(view, name)
        existing = self._members(view, gid)
        if existing:
            sources = sorted(s.source_volume_id for _, s in existing)
            size = int(existing[0][0].tag(model.GROUP_SIZE) or 0)
            if size != len(members) or not set(sources) <= set(members):
                raise AlreadyExists(f"group snapshot {name!r} already exists with other volumes")
            if sources == members and not self._unfinished(view, gid):
                return self._group(gid, existing)
        for vid in members:
            if await self.store.find(vid, "v") is None:
                raise NotFound(f"source volume {vid} does not exist")
        pairs = [(member_name(name, vid), vid) for vid in members]
        try:
            await self._discard_group(gid, view)  # what a half-deleted or failed group left
            snaps = await self._create(pairs, (gid, name, len(members)))
            await self._let_go(snaps)
        except BaseException:
            await self._discard_group(gid)
            raise
        # The tags are exactly what GetVolumeGroupSnapshot will read back.
        ordered = tuple(sorted(snaps, key=lambda s: s.id))
        return GroupSnapshot(gid, name, ordered, min(s.created_ns for s in ordered))

    def _all_members(self, view: View, group_id: str) -> list[LvInfo]:
        """Every snapshot LV of the group, finished or not (not those being wiped)."""
        return [
            lv
            for lv in view.all()
            if model.owned(lv, self.store.owner)
            and lv.tag(model.KIND) == "s"
            and lv.tag(model.GROUP) == group_id
            and not lv.has(model.WIPE)
        ]

    def _unfinished(self, view: View, group_id: str) -> bool:
        return group_id in model.unfinished_groups(self._all_members(view, group_id), self.store.owner)

    async def _let_go(self, snaps: list[Snapshot]) -> None:
        """One lvchange takes ``elv.pending`` off every member."""
        paths = []
        for snap in snaps:
            parsed = self.store.oid(snap.id, "s")
            assert parsed is not None  # _create issued these IDs
            paths.append(f"{parsed[0].vg}/{model.lv_name(parsed[1])}")
        try:
            await self.store.lvm.change("lvchange", "--deltag", model.PENDING, *paths)
        finally:
            self.store.inv.invalidate()

    async def _discard_group(self, group_id: str, view: View | None = None) -> None:
        view = view or await self.store.view(fresh=True)
        for lv in self._all_members(view, group_id):
            if self.store.wipe_needed(view, lv):
                await self.wiper.quarantine(lv)  # renamed: the members' names are free at once
            else:
                await self._remove(view, lv)

    async def get_group(self, group_id: str) -> GroupSnapshot | None:
        if ids.parse(group_id, "g") is None:
            return None
        view = await self.store.view()
        members = self._members(view, group_id)
        if not members or self._unfinished(view, group_id):
            return None
        if len(members) != int(members[0][0].tag(model.GROUP_SIZE) or 0):
            return None  # half deleted: DeleteVolumeGroupSnapshot finishes it
        return self._group(group_id, members)

    async def delete_group(self, group_id: str) -> None:
        if ids.parse(group_id, "g") is None:
            return
        view = await self.store.view(fresh=True)
        for lv in self._all_members(view, group_id):  # pending ones too: nothing of the group stays
            await self._remove(view, lv)
