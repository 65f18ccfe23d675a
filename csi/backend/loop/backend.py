"""The loop backend: one sparse (or thick) file per volume, attached as a loop
device on the node that stages it.

Controller and node run on the same machine for this backend (the pool is a
local directory), which lets DeleteVolume see whether a volume is attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace

from csi.backend.base import Parameters, SnapshotsByPart, check_compatible, check_source_fits
from csi.backend.loop import files
from csi.backend.loop.alloc import Allocation
from csi.backend.loop.snapshots import LoopSnapshots
from csi.backend.loop.store import Store
from csi.errors import (
    CommandError,
    FailedPrecondition,
    InUse,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from csi.host import loop as loopdev
from csi.host.fs import FsTool
from csi.host.runner import Runner
from csi.model import (
    PROVISIONING,
    Capacity,
    Device,
    Health,
    PoolStats,
    Source,
    Volume,
    VolumeSpec,
    ids,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
POOL = "loop"
#: The logical block size of a new volume's loop device (see DEFAULT_BLOCK_SIZE).
BLOCK_SIZE = "elv.csi.dev/block-size"
PARAMETERS = Parameters(
    values={PROVISIONING: frozenset({"thin", "thick"}), BLOCK_SIZE: frozenset({"512", "4096"})},
    # A sparse volume can be made thick later (every block allocated), and back.
    mutable=frozenset({PROVISIONING}),
)
#: New volumes' logical block size. 4 KiB matches the filesystems' block size and
#: measured faster through the loop driver (fio 4k randwrite 0.64 -> 0.73 of the
#: pool's own IOPS). A volume keeps its block size for life: xfs records its
#: sector size and will not mount on a device with a larger one.
DEFAULT_BLOCK_SIZE = 4096
LEGACY_BLOCK_SIZE = 512


@dataclass(frozen=True)
class SourceImage:
    """The image a new volume is copied from, once it is known to fit."""

    path: str
    size: int
    #: The filesystem really on it (None: never formatted).
    formatted: str | None
    block_size: int
    #: The source volume (None for a snapshot, which nothing writes to).
    volume: Volume | None = None


class LoopBackend(SnapshotsByPart):
    """Snapshots and groups are in snapshots.py (SnapshotsByPart hands them over)."""

    kind = "loop"
    snaps: LoopSnapshots
    parameters = PARAMETERS
    granularity = MiB
    min_size = MiB

    def __init__(
        self,
        root: str,
        runner: Runner,
        *,
        overprovision_ratio: float = 1.0,
        direct_io: bool = True,
        sys_block: str = loopdev.SYS_BLOCK,
    ) -> None:
        self.store = Store(root)
        self._run = runner
        self._loop = loopdev.LoopTool(runner, direct_io=direct_io, sys_block=sys_block)
        self._fs = FsTool(runner)
        self._sys_block = sys_block
        self._ratio = overprovision_ratio
        self._reserved = 0  # bytes promised to creates still in progress
        self.alloc = Allocation(self.store.volumes_dir, self.store.snapshots_dir)
        self._ready = False
        self.snaps = LoopSnapshots(self.store, POOL, self._fs, self._copy, self._reserve, sys_block, self.alloc)

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        await self.snaps.thaw_leftovers()
        removed = await asyncio.to_thread(self.store.open)
        for r in removed:
            log.warning("recovery: removed unfinished %s", r)
        await asyncio.to_thread(self.alloc.scan)
        await asyncio.to_thread(self._loop.seed)
        await self._keep_thick_allocated()
        self._ready = True
        log.info(
            "loop pool %s: %d volumes, %d snapshots",
            self.store.root,
            len(self.store.volumes),
            len(self.store.snapshots),
        )

    async def _keep_thick_allocated(self) -> None:
        """Thick volumes staged before this process started (by a driver that
        let their devices discard, perhaps) stop freeing blocks now."""
        for vol in self.store.volumes.values():
            oid = self._vid(vol.id)
            if vol.thick and oid is not None:
                dev = self._loop.lookup(self.store.volume_image(oid))
                if dev is None:
                    continue
                try:
                    await self._loop.stop_discards(dev.name)
                except FailedPrecondition as e:
                    # Not a reason to serve nothing: its next stage says so too.
                    log.warning("thick volume %s: %s", vol.id, e.message)

    async def stop(self) -> None:
        await self.alloc.settle()

    async def probe(self) -> None:
        if not self._ready:
            raise Unavailable("the loop pool is still starting")
        if not os.access(self.store.volumes_dir, os.W_OK):
            raise Unavailable(f"the loop pool {self.store.root} is not writable")
        if not os.path.exists("/dev/loop-control"):
            raise Unavailable("/dev/loop-control is missing: load the loop module (modprobe loop)")

    # -- IDs --------------------------------------------------------------------

    def _vid(self, volume_id: str) -> ids.ObjectId | None:
        oid = ids.parse(volume_id, "v")
        return oid if oid is not None and oid.pool == POOL else None

    def _sid(self, snapshot_id: str) -> ids.ObjectId | None:
        oid = ids.parse(snapshot_id, "s")
        return oid if oid is not None and oid.pool == POOL else None

    # -- capacity -----------------------------------------------------------------

    async def _allocated(self) -> tuple[int, int]:
        return await self.alloc.totals()

    async def _promisable(self) -> int:
        """Bytes that can still be promised to new (sparse) volumes.

        The pool can hold what is free plus what ELV already allocated; times the
        overprovision ratio, minus every volume's full size (each sparse volume
        may yet fill up), what snapshots take, and what in-flight creates
        reserved. Overprovisioning never promises more than the ratio times
        the space still free, so a physically full pool promises nothing.
        """
        st = await asyncio.to_thread(os.statvfs, self.store.root)
        free = st.f_bavail * st.f_frsize
        vol_alloc, snap_alloc = await self._allocated()
        pool = free + vol_alloc + snap_alloc
        promised = self.store.provisioned + snap_alloc + self._reserved
        return max(0, min(int(pool * self._ratio) - promised, int(free * self._ratio) - self._reserved))

    async def capacity(self, parameters: Mapping[str, str]) -> Capacity:
        avail = await self._promisable()
        if parameters.get(PROVISIONING) == "thick":
            st = await asyncio.to_thread(os.statvfs, self.store.root)
            avail = min(avail, st.f_bavail * st.f_frsize)
        avail -= avail % self.granularity
        return Capacity(available=avail, maximum_volume_size=avail, minimum_volume_size=self.min_size)

    @contextlib.asynccontextmanager
    async def _reserve(self, size: int, what: str) -> AsyncIterator[None]:
        if size > await self._promisable():
            raise ResourceExhausted(
                f"the loop pool cannot promise {size} more bytes for {what}; free space or expand the pool"
            )
        self._reserved += size
        try:
            yield
        finally:
            self._reserved -= size

    # -- volumes ------------------------------------------------------------------

    async def get_volume(self, volume_id: str) -> Volume | None:
        return self.store.volumes.get(volume_id) if self._vid(volume_id) else None

    async def list_volumes(self) -> list[Volume]:
        return [self.store.volumes[k] for k in sorted(self.store.volumes)]

    async def _source(self, src: Source, spec: VolumeSpec) -> SourceImage:
        """The image of a content source, checked to fit ``spec``."""
        vol: Volume | None = None
        if src.kind == "snapshot":
            sid = self._sid(src.id)
            snap = self.store.snapshots.get(src.id) if sid else None
            if sid is None or snap is None:
                raise NotFound(f"source snapshot {src.id} does not exist")
            access, formatted, path, size = snap.access, snap.fs_type, self.store.snapshot_image(sid), snap.size
            intended, block = snap.fs_type, snap.block_size
        else:
            vid = self._vid(src.id)
            vol = self.store.volumes.get(src.id) if vid else None
            if vid is None or vol is None:
                raise NotFound(f"source volume {src.id} does not exist")
            access, formatted, path, size = vol.access, vol.formatted, self.store.volume_image(vid), vol.size
            intended, block = vol.fs_type, vol.block_size
        block = block or LEGACY_BLOCK_SIZE
        asked = spec.parameters.get(BLOCK_SIZE)
        if asked and int(asked) != block:
            raise FailedPrecondition(f"the source has {block}-byte blocks; a copy of it cannot have {asked}")
        check_source_fits(spec, access, formatted or intended, size)
        return SourceImage(path, size, formatted, block, vol)

    async def create_volume(self, spec: VolumeSpec) -> Volume:
        existing = self.store.volume_named(spec.name)
        if existing is not None:
            check_compatible(existing, spec, self.parameters.placement)
            return existing
        src = await self._source(spec.source, spec) if spec.source else None
        oid = self.store.fresh("v", POOL, spec.name)
        # The image is built under its final name: until the metadata commits it,
        # it is garbage that startup removes, never a volume (see store.py).
        final = self.store.volume_image(oid)
        async with self._reserve(spec.size, f"volume {spec.name!r}"):
            try:
                if src is None:
                    await asyncio.to_thread(files.make_image, final, spec.size, spec.thick)
                else:
                    await self._copy_point_in_time(src, final)
                    await asyncio.to_thread(files.resize_image, final, spec.size, spec.thick)
                vol = Volume(
                    id=str(oid),
                    name=spec.name,
                    size=spec.size,
                    access=spec.access,
                    fs_type=spec.fs_type,
                    thick=spec.thick,
                    source=spec.source,
                    parameters=dict(spec.parameters),
                    created_ns=time.time_ns(),
                    formatted=src.formatted if src else None,
                    block_size=src.block_size if src else int(spec.parameters.get(BLOCK_SIZE, DEFAULT_BLOCK_SIZE)),
                    mutable=dict(spec.mutable),
                )
                await self.store.put_volume(vol)
            except BaseException:
                await asyncio.to_thread(files.discard, final)
                raise
        await self.alloc.track(final)
        log.info("created volume %s (%d bytes)", vol.id, vol.size)
        return vol

    async def _copy_point_in_time(self, src: SourceImage, dst: str) -> None:
        """Copy a source image as one instant: a clone of a staged volume is
        crash-consistent like a snapshot of it, never a copy of an image that
        changes under the copy (which may not even mount). The source's
        filesystem is frozen for the copy alone, exactly as CreateSnapshot
        does: on a pool that can reflink that is the moment of the reflink; on
        one that cannot, it lasts the copy (as a snapshot's does). Growing or
        allocating the clone happens after the thaw. A raw block source has
        nothing to freeze: its copy is one instant only where the pool can
        reflink (README, Known limits)."""
        if src.volume is None:
            await self._copy(src.path, dst, src.size)
            return
        async with self.snaps.frozen([src.volume]):
            await self._copy(src.path, dst, src.size)

    async def _copy(self, src: str, dst: str, size: int) -> None:
        await asyncio.to_thread(files.discard, dst)
        # cp shares blocks where the pool filesystem can (xfs, btrfs) and keeps holes elsewhere.
        timeout = 120 + size / (50 * MiB)
        try:
            await self._run.run(["cp", "--reflink=auto", "--sparse=always", "--", src, dst], timeout=timeout)
        except CommandError as e:
            await asyncio.to_thread(files.discard, dst)
            if b"No space left" in e.stderr:
                raise ResourceExhausted("the loop pool ran out of space while copying") from e
            raise

    async def delete_volume(self, volume_id: str) -> None:
        oid = self._vid(volume_id)
        if oid is None:
            return
        image = self.store.volume_image(oid)
        attached = await asyncio.to_thread(self._loop.find_all, image)  # never trust a cache to delete
        if attached:
            raise InUse(f"volume {volume_id} is staged on this node ({attached[0].path}); unstage it before deleting")
        vol = self.store.volumes.get(volume_id)
        if vol is not None and vol.attachments:
            raise InUse(f"volume {volume_id} is published to node {next(iter(vol.attachments))}; unpublish it first")
        if volume_id not in self.store.volumes and not os.path.exists(image):
            return
        await self.store.drop_volume(oid)
        self.alloc.forget(image)
        log.info("deleted volume %s", volume_id)

    async def expand_volume(self, volume_id: str, size: int) -> Volume:
        oid = self._vid(volume_id)
        vol = self.store.volumes.get(volume_id) if oid else None
        if oid is None or vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        if vol.size >= size:
            return vol
        async with self._reserve(size - vol.size, f"growing volume {volume_id}"):
            await asyncio.to_thread(files.resize_image, self.store.volume_image(oid), size, vol.thick)
            await self.alloc.track(self.store.volume_image(oid))
            grown = replace(vol, size=size)
            await self.store.put_volume(grown)
        log.info("expanded volume %s to %d bytes", volume_id, size)
        return grown

    async def set_attachment(self, volume_id: str, node_id: str, readonly: bool | None) -> Volume:
        vol = self.store.volumes.get(volume_id) if self._vid(volume_id) else None
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        att = dict(vol.attachments)
        if readonly is None:
            att.pop(node_id, None)
        else:
            att[node_id] = readonly
        if att != vol.attachments:
            vol = replace(vol, attachments=att)
            await self.store.put_volume(vol)
        return vol

    async def modify_volume(self, volume_id: str, mutable: Mapping[str, str]) -> Volume:
        vol = self.store.volumes.get(volume_id) if self._vid(volume_id) else None
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        want = mutable.get(PROVISIONING)
        if want is None or (want == "thick") == vol.thick:
            return vol
        oid = self._vid(volume_id)
        assert oid is not None
        if want == "thick":
            # Reserve the rest of the volume now: allocate every block.
            image = self.store.volume_image(oid)
            allocated = (await asyncio.to_thread(os.stat, image)).st_blocks * 512
            async with self._reserve(0, f"making volume {volume_id} thick"):
                st = await asyncio.to_thread(os.statvfs, self.store.root)
                if vol.size - allocated > st.f_bavail * st.f_frsize:
                    raise ResourceExhausted(f"the loop pool has no room to make volume {volume_id} thick")
                # A staged volume's device stops freeing blocks first, so none is
                # freed between the fallocate and the end of its life.
                for dev in await asyncio.to_thread(self._loop.find_all, image):
                    await self._loop.stop_discards(dev.name)
                await asyncio.to_thread(files.resize_image, image, vol.size, True)
            await self.alloc.track(image)
        # thick -> thin keeps the blocks; it only stops promising them. A staged
        # device keeps refusing discards until the volume is next staged.
        vol = replace(vol, thick=want == "thick")
        await self.store.put_volume(vol)
        log.info("volume %s is now %s", volume_id, want)
        return vol

    # -- node side -------------------------------------------------------------

    def _image(self, volume_id: str) -> str:
        oid = self._vid(volume_id)
        if oid is None or volume_id not in self.store.volumes:
            raise NotFound(f"volume {volume_id} does not exist")
        return self.store.volume_image(oid)

    async def attach(self, volume_id: str) -> Device:
        image = self._image(volume_id)
        if not os.path.exists(image):
            raise FailedPrecondition(f"the backing file of volume {volume_id} is missing")
        vol = self.store.volumes[volume_id]
        # A thick volume's device may never free a block of its file: not for
        # mkfs, ext4's lazy init, fstrim, -o discard or blkdiscard (host/loop.py).
        dev = await self._loop.attach(image, vol.block_size or LEGACY_BLOCK_SIZE, discards=not vol.thick)
        return _device(dev.name)

    async def detach(self, volume_id: str) -> None:
        oid = self._vid(volume_id)
        if oid is None:
            return
        for dev in await asyncio.to_thread(self._loop.find_all, self.store.volume_image(oid)):
            await self._loop.detach(dev.name)

    async def find_device(self, volume_id: str) -> Device | None:
        oid = self._vid(volume_id)
        if oid is None:
            return None
        found = self._loop.lookup(self.store.volume_image(oid))
        return _device(found.name) if found else None

    async def refresh_device(self, volume_id: str) -> int:
        dev = await self.find_device(volume_id)
        if dev is None:
            raise FailedPrecondition(f"volume {volume_id} is not staged on this node")
        size = await self._loop.refresh_capacity(dev.name)
        vol = self.store.volumes.get(volume_id)
        if vol is not None and vol.thick:
            await self._loop.stop_discards(dev.name)  # kernels that reset limits on a resize
        return size

    async def proven_blank(self, volume_id: str) -> bool:
        oid = self._vid(volume_id)
        if oid is None or volume_id not in self.store.volumes:
            return False
        return await asyncio.to_thread(files.proven_blank, self.store.volume_image(oid))

    async def mark_formatted(self, volume_id: str, fs_type: str, *, complete: bool = True) -> None:
        oid = self._vid(volume_id)
        vol = self.store.volumes.get(volume_id) if oid else None
        if oid is None or vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        if complete and vol.formatted == fs_type and vol.formatting is None:
            return
        if not complete and vol.formatting == fs_type:
            return
        await self.store.mark_format(oid, fs_type, complete=complete)

    async def pool_stats(self) -> list[PoolStats]:
        st = await asyncio.to_thread(os.statvfs, self.store.root)
        vol_alloc, snap_alloc = await self._allocated()
        return [
            PoolStats(
                pool=POOL,
                size_bytes=st.f_blocks * st.f_frsize,
                used_bytes=vol_alloc + snap_alloc,
                available_bytes=(await self.capacity({})).available,
                volumes=len(self.store.volumes),
                snapshots=len(self.store.snapshots),
            )
        ]

    async def health(self, volume_id: str, *, node: bool = True) -> Health:
        oid = self._vid(volume_id)
        if oid is None or volume_id not in self.store.volumes:
            return Health(True, "the volume's metadata is missing")
        image = self.store.volume_image(oid)
        if not os.path.exists(image):
            return Health(True, "the volume's backing file is missing")
        if node and self._loop.lookup(image) is None:
            return Health(True, "the volume's loop device is not attached")
        return Health(False, "ok")


def _device(name: str) -> Device:
    major, minor = loopdev.device_numbers(name)
    return Device(name=name, path="/dev/" + name, major=major, minor=minor)
