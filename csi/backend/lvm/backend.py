"""The LVM backend: thick and thin LVs in device classes, LVM metadata the only state.

Each RPC reads LVM's own report first (see inventory.py) and acts on what it
finds, so a repeat or a retry after a crash does the right thing without any
record of its own. Snapshots and clones are in snapshots.py and clone.py,
the node side in node.py, deletion in wipe.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import replace

from csi.backend.base import SnapshotsByPart, check_compatible
from csi.backend.lvm import model, params
from csi.backend.lvm.classes import DeviceClass, LvmSettings
from csi.backend.lvm.clone import Cloner
from csi.backend.lvm.inventory import View
from csi.backend.lvm.node import LvmNode
from csi.backend.lvm.recovery import recover
from csi.backend.lvm.report import LvInfo, classify
from csi.backend.lvm.snapshots import LvmSnapshots
from csi.backend.lvm.store import LvStore
from csi.backend.lvm.wipe import Wiper
from csi.errors import AlreadyExists, CommandError, InUse, NotFound, Unavailable
from csi.model import DEFAULT_FS, AccessType, Capacity, Device, Health, PoolStats, Volume, VolumeSpec, round_up

log = logging.getLogger(__name__)

#: How long DeleteVolume waits for a volume that is open but mounted nowhere
#: to close: udev probes (blkid opens) every LV an LVM change touched, a COW
#: origin after its snapshot's lvcreate included. With reports from the
#: resident lvm shell, a delete right after a snapshot looked within that
#: window and was refused (tests/lvm/test_lvm_lifecycle.py, 2026-12-05).
OPEN_GRACE = 3.0
MiB = 1024 * 1024


class LvmBackend(SnapshotsByPart):
    """Snapshots and groups are in snapshots.py (SnapshotsByPart hands them over)."""

    kind = "lvm"
    snaps: LvmSnapshots
    parameters = params.PARAMETERS
    granularity = MiB
    min_size = MiB

    def __init__(self, settings: LvmSettings, store: LvStore) -> None:
        self.settings = settings
        self.store = store
        self.wiper = Wiper(store)
        self.snaps = LvmSnapshots(store, self.wiper)
        self.cloner = Cloner(store, self.wiper)
        self.node = LvmNode(store)
        self._ready = False

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        await recover(self.store, self.wiper)
        self.wiper.start()
        self._ready = True

    async def stop(self) -> None:
        await self.wiper.stop()

    async def probe(self) -> None:
        if not self._ready:
            raise Unavailable("the lvm backend is still starting")

    # -- volumes ---------------------------------------------------------------------

    async def get_volume(self, volume_id: str) -> Volume | None:
        found = await self.store.find(volume_id, "v")
        return model.to_volume(found[1], volume_id) if found else None

    async def list_volumes(self) -> list[Volume]:
        view = await self.store.view()
        out = []
        for lv in view.all():
            cls = self.store.class_of(lv)
            oid = model.parse_lv_name(lv.name)
            if cls and oid and oid.kind == "v" and model.live(lv, self.store.owner, "v"):
                out.append(model.to_volume(lv, str(oid)))
        return sorted(out, key=lambda v: v.id)

    async def _existing(self, view: View, spec: VolumeSpec, cls: DeviceClass) -> Volume | None:
        """The volume called ``spec.name``, checked against ``spec``; None if
        there is none. Finishes off what a create of that name left half-made."""
        live = []
        for lv in self.store.named(view, "v", spec.name):
            if lv.has(model.PENDING):
                await self.wiper.quarantine(lv, rename=False)
            else:
                live.append(lv)
        if not live:
            return None
        # One name, one volume; pools from before names were looked up by tag
        # may hold one per class: the requested class's is the one.
        candidates = [(model.parse_lv_name(x.name), x) for x in live]
        oid, lv = next(((o, x) for o, x in candidates if o is not None and o.pool == cls.name), candidates[0])
        assert oid is not None  # LvStore.named found its class by it
        if oid.pool != cls.name:
            raise AlreadyExists(f"volume {spec.name!r} already exists in device class {oid.pool}")
        vol = model.to_volume(lv, str(oid))
        check_compatible(vol, spec, self.parameters.placement)
        return vol

    async def create_volume(self, spec: VolumeSpec) -> Volume:
        cls = self.settings.pick(spec.parameters)
        layout = params.layout(spec.parameters, cls)
        view = await self.store.view(fresh=True)
        if cls.vg in view.missing:
            raise Unavailable(f"volume group {cls.vg} of device class {cls.name} is missing")
        existing = await self._existing(view, spec, cls)
        if existing is not None:
            return existing
        oid = self.store.fresh(view, cls, "v", spec.name)
        name = model.lv_name(oid)
        if spec.source is not None:
            return await self.cloner.create(spec, cls, oid, layout)
        size = self.store.lv_size(view, cls, spec)
        now = time.time_ns()
        # A new mount volume holds nothing anyone wrote: it carries the intent to
        # format from birth (as if ELV's own mkfs had begun), so staging it costs
        # one lvchange (elv.formatted, after mkfs), not two.
        intent = (spec.fs_type or DEFAULT_FS) if spec.access == AccessType.MOUNT else None
        tags = model.volume_tags(self.store.owner, spec, now, formatting=intent)
        if cls.thin_pool is not None:
            # Left active, as a thick LV is (its -Z y needs that): staging it then
            # runs no lvchange -ay, and unstaging deactivates it.
            argv = ["-n", name, "-V", f"{size}b", "--thinpool", cls.thin_pool, "-y"]
        else:
            # -W/-Z: clear signatures and the first 4 KiB even on extents ELV did not wipe.
            argv = ["-n", name, "-L", f"{size}b", "-W", "y", "-Z", "y", "-y", *layout.args]
        argv += ["--setactivationskip", "n", *model.addtags(tags), cls.vg]
        async with self.store.reserve(cls, size, f"volume {spec.name!r}", layout.copies):
            try:
                await self.store.lvm.change("lvcreate", *argv)
            except CommandError as e:
                raise classify(e, f"volume {spec.name!r} ({size} bytes)") from e
        log.info("created volume %s (%s/%s, %d bytes)", oid, cls.vg, name, size)
        if layout.args:
            # Striped and raid1 LVs may be rounded further (whole stripes): ask LVM.
            found = await self.store.find(str(oid), "v", fresh=True)
            if found is None:
                raise NotFound(f"volume {oid} vanished right after lvcreate")
            return model.to_volume(found[1], str(oid))
        # One lvcreate made exactly this (the size is whole extents): no need to ask.
        return Volume(
            str(oid),
            spec.name,
            size,
            spec.access,
            spec.fs_type,
            cls.thin_pool is None,
            None,
            dict(spec.parameters),
            now,
            formatting=intent,
            mutable=dict(spec.mutable),
        )

    async def delete_volume(self, volume_id: str) -> None:
        # reload: whether the LV is open changes outside LVM (mounts).
        found = await self.store.find_owned(volume_id, "v", reload=True)
        if found is None:
            return  # missing, or not ELV's: never touched
        lv, view = found
        if not lv.has(model.WIPE):
            found = await self._closed(volume_id, lv, view)
            if found is None:
                return
            lv, view = found
            if lv.open or await self.store.mounts_of(lv):
                raise InUse(f"volume {volume_id} is open or mounted on this node; unstage it before deleting")
            att = model.attachments(lv)
            if att:
                raise InUse(f"volume {volume_id} is published to node {next(iter(att))}; unpublish it first")
        if self.store.wipe_needed(view, lv) or lv.is_origin:
            await self.wiper.quarantine(lv, rename=False)
        else:
            try:
                await self.store.lvm.change("lvremove", "-y", f"{lv.vg}/{lv.name}")
            finally:
                self.store.inv.invalidate()
        log.info("deleted volume %s", volume_id)

    async def _closed(self, volume_id: str, lv: LvInfo, view: View) -> tuple[LvInfo, View] | None:
        """The LV once nothing holds it open, or as it is after OPEN_GRACE
        seconds: open and mounted nowhere is most likely a passing probe.
        A mounted volume is refused at once."""
        deadline = time.monotonic() + OPEN_GRACE
        while lv.open and time.monotonic() < deadline and not await self.store.mounts_of(lv):
            await asyncio.sleep(0.25)
            found = await self.store.find_owned(volume_id, "v", reload=True)
            if found is None:
                return None
            lv, view = found
        return lv, view

    async def expand_volume(self, volume_id: str, size: int) -> Volume:
        cls, lv, view = await self.store.must_find(volume_id, fresh=True)
        if lv.size >= size:
            return model.to_volume(lv, volume_id)
        if lv.is_origin:
            # LVM grows a COW origin only while it has no snapshot (or is
            # inactive). Deleted snapshots may still wait for the wiper: finish them now.
            gone = [x for x in view.in_vg(lv.vg) if x.origin == lv.name and x.has(model.WIPE)]
            if gone:
                await self.wiper.finish(view, gone)
                cls, lv, view = await self.store.must_find(volume_id, fresh=True)
        target = round_up(size, self.store.extent(view, cls))
        copies = 2 if lv.segtype == "raid1" else 1
        async with self.store.reserve(cls, target - lv.size, f"growing volume {volume_id}", copies):
            try:
                await self.store.lvm.change("lvextend", "-y", "-L", f"{target}b", f"{lv.vg}/{lv.name}")
            except CommandError as e:
                raise classify(e, f"growing volume {volume_id} to {target} bytes") from e
        if lv.segtype in ("linear", "thin"):
            # lvextend made exactly this (whole extents): no need to ask.
            grown = replace(lv, size=target)
        else:
            # Striped and raid1 LVs may be rounded further (whole stripes): ask LVM.
            _, grown, _ = await self.store.must_find(volume_id, fresh=True)
        log.info("expanded volume %s to %d bytes", volume_id, grown.size)
        return model.to_volume(grown, volume_id)

    async def capacity(self, parameters: Mapping[str, str]) -> Capacity:
        cls = self.settings.pick(parameters)
        layout = params.layout(parameters, cls)
        view = await self.store.view()
        avail = self.store.available(view, cls, layout.copies)
        extent = view.vgs[cls.vg].extent_size if cls.vg in view.vgs else MiB
        return Capacity(available=avail, maximum_volume_size=avail, minimum_volume_size=extent)

    async def _retag(self, lv: LvInfo, view: View, add: list[str], remove: list[str]) -> LvInfo:
        """Change the LV's tags in one lvchange; return it as it now is."""
        args: list[str] = []
        for t in remove:
            args += ["--deltag", t]
        args += model.addtags(add)
        if not args:
            return lv
        try:
            await self.store.lvm.change("lvchange", *args, f"{lv.vg}/{lv.name}")
        except BaseException:
            self.store.inv.invalidate()
            raise
        changed = lv.with_tags(add, remove)
        self.store.inv.apply(view, changed)
        return changed

    async def set_attachment(self, volume_id: str, node_id: str, readonly: bool | None) -> Volume:
        _, lv, view = await self.store.must_find(volume_id, fresh=True)
        mine = model.node_attachment_tags(lv, node_id)
        add = [] if readonly is None else [model.attachment_tag(node_id, readonly)]
        if sorted(mine) != sorted(add):
            lv = await self._retag(lv, view, [t for t in add if t not in mine], [t for t in mine if t not in add])
        return model.to_volume(lv, volume_id)

    async def modify_volume(self, volume_id: str, mutable: Mapping[str, str]) -> Volume:
        _, lv, _ = await self.store.must_find(volume_id, fresh=True)
        return model.to_volume(lv, volume_id)

    async def proven_blank(self, volume_id: str) -> bool:
        """Never: LVM reports a thin LV's use only as a rounded percentage
        (0.00 % of 1 TiB is up to 55 MB), so an LV is always probed with blkid."""
        return False

    async def mark_formatted(self, volume_id: str, fs_type: str, *, complete: bool = True) -> None:
        """``elv.formatting=<fs>`` before mkfs, ``elv.formatted=<fs>`` after it (one lvchange each)."""
        _, lv, view = await self.store.must_find(volume_id, fresh=True)
        key = model.FORMATTED if complete else model.FORMATTING
        stale = [t for t in lv.tags if t.startswith((model.FORMATTED + "=", model.FORMATTING + "="))]
        want = model.tag(key, fs_type)
        drop = [t for t in stale if t != want and (complete or t.startswith(model.FORMATTING + "="))]
        if want not in lv.tags or drop:
            await self._retag(lv, view, [want] if want not in lv.tags else [], drop)

    async def pool_stats(self) -> list[PoolStats]:
        view = await self.store.view()
        vols = await self.list_volumes()
        snaps = await self.snaps.all()
        out = []
        for cls in sorted(self.settings.classes.values(), key=lambda c: c.name):
            space = view.vgs.get(cls.vg)
            pool = view.lv(cls.vg, cls.thin_pool) if cls.thin_pool else None
            if pool is not None:
                size, used = pool.size, int(pool.size * (pool.data_percent or 0.0) / 100)
            else:
                size = space.size if space else 0
                used = size - (space.free if space else 0)
            prefix = f"-{cls.name}-"
            out.append(
                PoolStats(
                    pool=cls.name,
                    size_bytes=size,
                    used_bytes=used,
                    available_bytes=self.store.available(view, cls),
                    volumes=sum(1 for v in vols if prefix in v.id),
                    snapshots=sum(1 for s in snaps if prefix in s.id),
                    thin_data_percent=pool.data_percent if pool else None,
                    thin_metadata_percent=pool.metadata_percent if pool else None,
                )
            )
        return out

    # -- node side (node.py) --------------------------------------------------------------

    async def attach(self, volume_id: str) -> Device:
        return await self.node.attach(volume_id)

    async def detach(self, volume_id: str) -> None:
        await self.node.detach(volume_id)

    async def find_device(self, volume_id: str) -> Device | None:
        return await self.node.find_device(volume_id)

    async def refresh_device(self, volume_id: str) -> int:
        return await self.node.refresh_device(volume_id)

    async def health(self, volume_id: str, *, node: bool = True) -> Health:
        return await self.node.health(volume_id, node=node)
