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

import logging
import mmap
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from csi.backend.base import check_source_fits
from csi.backend.lvm import capacity as cap
from csi.backend.lvm import model
from csi.backend.lvm.classes import DeviceClass
from csi.backend.lvm.inventory import View
from csi.backend.lvm.params import Layout
from csi.backend.lvm.report import LvInfo, classify
from csi.backend.lvm.snapshots import cow_size
from csi.backend.lvm.store import LvStore
from csi.backend.lvm.wipe import Wiper
from csi.errors import CommandError, FailedPrecondition, NotFound, ResourceExhausted
from csi.host.stoppable import Stopped, run_stoppable
from csi.model import Volume, VolumeSpec, ids

log = logging.getLogger(__name__)
CHUNK = 4 * 1024 * 1024
PROGRESS_SECONDS = 5.0


def data_runs(buf: mmap.mmap, n: int, grain: int) -> Iterator[tuple[int, int]]:
    """The [start, end) runs of ``buf[:n]`` that hold data, in whole ``grain``
    steps: a grain that reads all zeros is left out."""
    zeros = bytes(grain)
    run = -1
    for a in range(0, n, grain):
        b = min(a + grain, n)
        chunk = buf[a:b]  # a copy, then one memcmp: far faster than comparing a memoryview
        empty = chunk == zeros if b - a == grain else chunk.count(0) == b - a
        if empty and run >= 0:
            yield run, a
            run = -1
        elif not empty and run < 0:
            run = a
    if run >= 0:
        yield run, n


def copy_blocks(
    src: str, dst: str, size: int, label: str, *, sparse: int = 0, stop: threading.Event | None = None
) -> int:
    """Copy ``size`` bytes between block devices with O_DIRECT (no page cache
    churn, and the data is on the target when this returns), logging progress;
    return the bytes written.

    ``sparse`` (a grain, e.g. the thin pool's chunk size): grains that read as
    zeros are not written. Only for a target that reads zeros already: a fresh
    thin LV in a pool that zeroes new blocks. Writing them would map them, so a
    clone would take its source's whole size from the pool, zeros included.
    Between chunks the copy gives up (Stopped) once ``stop`` is set."""
    fin = os.open(src, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        try:
            done = written = 0
            start = last = time.monotonic()
            # An anonymous mmap is page aligned, as O_DIRECT requires.
            with mmap.mmap(-1, CHUNK) as buf, memoryview(buf) as whole:
                while done < size:
                    if stop is not None and stop.is_set():
                        raise Stopped(f"copy {label} stopped at byte {done} of {size}")
                    with whole[: min(CHUNK, size - done)] as view:
                        n = os.preadv(fin, [view], done)
                    if n <= 0:
                        raise OSError(f"short read from {src} at {done}")
                    for a, b in data_runs(buf, n, sparse) if sparse else [(0, n)]:
                        with whole[a:b] as part:
                            written += _write_all(fout, part, done + a)
                    done += n
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
    log.info(
        "copy %s: done, %d MiB in %.1fs, %d MiB written",
        label,
        size >> 20,
        time.monotonic() - start,
        written >> 20,
    )
    return written


def _write_all(fd: int, data: memoryview, offset: int) -> int:
    total = 0
    while total < len(data):
        with data[total:] as rest:
            n = os.pwritev(fd, [rest], offset + total)
        if n <= 0:
            raise OSError(f"short write at {offset + total}")
        total += n
    return total


@dataclass
class Room:
    """Bytes of a thin pool held for one block copy, and the grain it copies
    sparsely with (0: the target may not read zeros, so every byte is written)."""

    held: dict[str, int]
    cls: str
    need: int
    grain: int

    def release(self) -> None:
        self.held[self.cls] -= self.need


class Cloner:
    def __init__(self, store: LvStore, wiper: Wiper) -> None:
        self.store = store
        self.wiper = wiper
        #: Bytes the block copies in flight may still write, by thin class.
        self._copying: dict[str, int] = {}

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
        instant = cls.thin_pool is not None and src.thin and src.vg == cls.vg and src.pool == cls.thin_pool
        room = None if instant else self._claim_room(view, cls, src, src_size, spec)
        try:
            return await self._make(spec, cls, oid, layout, (src, src_size, fs), view, room)
        finally:
            if room is not None:
                room.release()

    def _claim_room(self, view: View, cls: DeviceClass, src: LvInfo, src_size: int, spec: VolumeSpec) -> Room | None:
        """A block copy into a thin class: check that the pool can hold what it
        will write (below the class's threshold, less the copies in flight) and
        hold that much until the copy ends; RESOURCE_EXHAUSTED, before anything
        is made, when it cannot. The class's promise (reserve) does not cover
        this: with overprovisioning a pool promises more than it holds."""
        if cls.thin_pool is None:
            return None
        pool = view.lv(cls.vg, cls.thin_pool)
        if pool is None or not pool.thin_pool:
            return None  # reserve() answers that
        grain = cap.copy_grain(pool.chunk_size)
        need = cap.copy_bound(src, src_size, grain)
        busy = self._copying.get(cls.name, 0)
        room = cap.pool_room(pool, cls.full_threshold) - busy
        if need > room:
            raise ResourceExhausted(
                f"thin pool {pool.vg}/{pool.name} of device class {cls.name} can take {max(0, room)} more bytes "
                f"below its {cls.full_threshold:g}% threshold (data {pool.data_percent or 0.0:.1f}%"
                f"{f', {busy} bytes of copies in flight' if busy else ''}), and copying "
                f"{spec.source.id if spec.source else 'the source'} may write {need}"
            )
        self._copying[cls.name] = busy + need
        return Room(self._copying, cls.name, need, grain if pool.zero is True else 0)

    async def _make(
        self,
        spec: VolumeSpec,
        cls: DeviceClass,
        oid: ids.ObjectId,
        layout: Layout,
        source: tuple[LvInfo, int, str | None],
        view: View,
        room: Room | None,
    ) -> Volume:
        src, src_size, fs = source
        size = self.store.lv_size(view, cls, spec)
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
                        await self.store.lvm.change("lvextend", "-y", "-L", f"{size}b", path)
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
                await self._copy(src, src_size, cls, name, oid, sparse=room.grain if room else 0)
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

    async def _copy(
        self, src: LvInfo, src_size: int, cls: DeviceClass, name: str, oid: ids.ObjectId, *, sparse: int = 0
    ) -> None:
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
            label = f"{src.name} -> {name}"
            await run_stoppable(
                lambda stop: copy_blocks(src_dev.path, dst_dev.path, src_size, label, sparse=sparse, stop=stop)
            )
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
