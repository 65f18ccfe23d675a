"""New volumes from a snapshot or from another volume.

* **Thin from thin, same pool:** a thin snapshot of the source, made
  writable and activatable: instant, whatever the size.
* **Everything else** (a thick target, or another pool): a new LV marked
  ``elv.pending``, filled by a block copy that logs its progress, then
  unmarked. A crash mid-copy leaves a pending LV that startup quarantines
  (it holds part of the source's data, so it is wiped like any other).

A source volume that is in use is never copied live: ELV copies from a
temporary snapshot of it (``elv-t-*``, consistent because LVM freezes the
filesystem while it snapshots), removed when the copy is done.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import time

from csi.backend.base import check_source_fits
from csi.backend.lvm import model
from csi.backend.lvm.classes import DeviceClass
from csi.backend.lvm.params import Layout
from csi.backend.lvm.report import LvInfo, classify
from csi.backend.lvm.snapshots import cow_size
from csi.backend.lvm.store import LvStore
from csi.backend.lvm.wipe import Wiper
from csi.errors import CommandError, FailedPrecondition, NotFound
from csi.model import Volume, VolumeSpec, ids, round_up

log = logging.getLogger(__name__)
CHUNK = 4 * 1024 * 1024
PROGRESS_SECONDS = 5.0


def copy_blocks(src: str, dst: str, size: int, label: str) -> None:
    """Copy ``size`` bytes between block devices with O_DIRECT (no page cache
    churn, and the data is on the target when this returns), logging progress."""
    fin = os.open(src, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        try:
            done = 0
            start = last = time.monotonic()
            # An anonymous mmap is page aligned, as O_DIRECT requires.
            with mmap.mmap(-1, CHUNK) as buf, memoryview(buf) as whole:
                while done < size:
                    view = whole[: min(CHUNK, size - done)]
                    n = os.preadv(fin, [view], done)
                    if n <= 0:
                        raise OSError(f"short read from {src} at {done}")
                    done += os.pwritev(fout, [view[:n]], done)
                    view.release()
                    now = time.monotonic()
                    if now - last >= PROGRESS_SECONDS:
                        last = now
                        rate = done / max(now - start, 1e-6) / 1048576
                        log.info(
                            "copy %s: %d%% (%d of %d MiB, %.0f MiB/s)",
                            label,
                            done * 100 // size,
                            done >> 20,
                            size >> 20,
                            rate,
                        )
            os.fsync(fout)
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    log.info("copy %s: done, %d MiB in %.1fs", label, size >> 20, time.monotonic() - start)


class Cloner:
    def __init__(self, store: LvStore, wiper: Wiper) -> None:
        self.store = store
        self.wiper = wiper

    async def _source(self, spec: VolumeSpec) -> tuple[LvInfo, int, str | None]:
        """(source LV, source size, filesystem) after checking the request fits it."""
        src = spec.source
        assert src is not None
        if src.kind == "snapshot":
            found = await self.store.find(src.id, "s", fresh=True)
            if found is None:
                raise NotFound(f"source snapshot {src.id} does not exist")
            snap = model.to_snapshot(found[1], src.id)
            if not snap.ready:
                raise FailedPrecondition(f"snapshot {src.id} overflowed its copy-on-write store and is invalid")
            lv, size, access, fs = found[1], snap.size, snap.access, snap.fs_type
        else:
            found = await self.store.find(src.id, "v", fresh=True)
            if found is None:
                raise NotFound(f"source volume {src.id} does not exist")
            vol = model.to_volume(found[1], src.id)
            lv, size, access, fs = found[1], vol.size, vol.access, vol.formatted or vol.fs_type
        check_source_fits(spec, access, fs, size)
        return lv, size, fs

    async def create(self, spec: VolumeSpec, cls: DeviceClass, oid: ids.ObjectId, layout: Layout) -> Volume:
        src, src_size, fs = await self._source(spec)
        view = await self.store.view(fresh=True)
        size = round_up(spec.size, self.store.extent(view, cls))
        name = model.lv_name(oid)
        instant = cls.thin_pool is not None and src.thin and src.vg == cls.vg and src.pool == cls.thin_pool
        pending = not instant or size > src.size
        tags = model.volume_tags(self.store.owner, spec, time.time_ns(), formatted=fs, pending=pending)
        what = f"volume {spec.name!r} from {spec.source.id if spec.source else '?'}"
        path = f"{cls.vg}/{name}"
        try:
            async with self.store.reserve(cls, size, what, layout.copies):
                if instant:
                    await self.store.lvm.change(
                        "lvcreate",
                        "-s",
                        "-n",
                        name,
                        "--setactivationskip",
                        "n",
                        "-y",
                        *model.addtags(tags),
                        f"{src.vg}/{src.name}",
                    )
                    if size > src.size:
                        await self.store.lvm.change("lvextend", "-L", f"{size}b", path)
                elif cls.thin_pool is not None:
                    await self.store.lvm.change(
                        "lvcreate",
                        "-n",
                        name,
                        "-V",
                        f"{size}b",
                        "--thinpool",
                        cls.thin_pool,
                        "-y",
                        *model.addtags(tags),
                        cls.vg,
                    )
                else:
                    await self.store.lvm.change(
                        "lvcreate",
                        "-n",
                        name,
                        "-L",
                        f"{size}b",
                        "-W",
                        "y",
                        "-Z",
                        "y",
                        "-y",
                        *layout.args,
                        *model.addtags(tags),
                        cls.vg,
                    )
        except CommandError as e:
            await self._discard(cls, name)
            raise classify(e, what) from e
        try:
            if not instant:
                await self._copy(src, src_size, cls, name, oid)
            if pending:
                await self.store.lvm.change("lvchange", "--deltag", model.PENDING, path)
        except BaseException:
            await self._discard(cls, name)
            raise
        finally:
            self.store.inv.invalidate()
        log.info(
            "created volume %s from %s (%s)",
            oid,
            spec.source.id if spec.source else "?",
            "thin snapshot" if instant else "block copy",
        )
        if not layout.args:
            # Made exactly so (whole extents, these tags): no need to ask.
            done = [t for t in tags if t != model.PENDING]
            return model.volume_of(str(oid), done, size, thick=cls.thin_pool is None)
        # Striped and raid1 LVs may be rounded further (whole stripes): ask LVM.
        found = await self.store.find(str(oid), "v", fresh=True)
        if found is None:
            raise NotFound(f"volume {oid} vanished right after it was made")
        return model.to_volume(found[1], str(oid))

    async def _discard(self, cls: DeviceClass, name: str) -> None:
        """Quarantine what a failed clone left (it may hold part of the source)."""
        view = await self.store.view(fresh=True)
        lv = view.lv(cls.vg, name)
        if lv is not None and model.owned(lv, self.store.owner):
            await self.wiper.quarantine(lv)

    async def _copy(self, src: LvInfo, src_size: int, cls: DeviceClass, name: str, oid: ids.ObjectId) -> None:
        temp: LvInfo | None = None
        was_active = src.active
        try:
            reading = src
            if src.open or await self.store.mounts_of(src):
                temp = await self._temp_snapshot(src, oid)
                reading = temp
            src_dev = await self.store.activate(reading)
            # lvcreate left the new LV active: its device is in sysfs, no report needed.
            dst_dev = await self.store.active_device(cls.vg, name)
            if dst_dev is None:
                view = await self.store.view(fresh=True)
                target = view.lv(cls.vg, name)
                if target is None:
                    raise NotFound(f"the new LV {cls.vg}/{name} vanished before the copy")
                dst_dev = await self.store.activate(target)
            await asyncio.to_thread(copy_blocks, src_dev.path, dst_dev.path, src_size, f"{src.name} -> {name}")
        finally:
            if temp is not None:
                await self.wiper.quarantine(temp)
            elif not was_active and src.thin:
                # Leave an unstaged thin source as it was (a COW origin stays
                # active with its snapshot; deactivating it is the node's call).
                view = await self.store.view(fresh=True)
                again = view.lv(src.vg, src.name)
                if again is not None and not again.open:
                    await self.store.deactivate(again)

    async def _temp_snapshot(self, src: LvInfo, oid: ids.ObjectId) -> LvInfo:
        name = model.temp_name(oid)
        tags = [model.tag(model.OWNER, self.store.owner), model.tag(model.KIND, "t")]
        args = ["-s", "-n", name, "-y", *model.addtags(tags)]
        if not src.thin:
            view = await self.store.view(fresh=True)
            args += ["-L", f"{cow_size(src.size, 100, view.vgs[src.vg].extent_size)}b"]
        try:
            await self.store.lvm.change("lvcreate", *args, f"{src.vg}/{src.name}")
        finally:
            self.store.inv.invalidate()
        view = await self.store.view(fresh=True)
        temp = view.lv(src.vg, name)
        if temp is None:
            raise NotFound(f"the temporary snapshot {src.vg}/{name} vanished")
        return temp
