"""ELV's LVs, the LVM backend's only store: what its parts (volumes,
snapshots, clones, the node side, the wiper) share.

:class:`LvStore` finds the live LV behind a volume or snapshot ID through
the cached view of the configured VGs, activates and deactivates LVs, and
holds the per-class capacity bookkeeping, with the settings, the lvm wrapper
and the owner tag they all need."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from csi.backend.lvm import capacity as cap
from csi.backend.lvm import devnode, model, report
from csi.backend.lvm.classes import DeviceClass, LvmSettings
from csi.backend.lvm.command import Lvm
from csi.backend.lvm.inventory import Inventory, View
from csi.backend.lvm.report import LvInfo
from csi.errors import CommandError, FailedPrecondition, InUse, NotFound, OutOfRange, ResourceExhausted, Unavailable
from csi.host.fs import FsTool
from csi.host.mountinfo import Mount, MountTable
from csi.host.runner import Runner
from csi.model import Device, VolumeSpec, ids, round_up

log = logging.getLogger(__name__)


def zeroing_fix(cls: str, pool: LvInfo) -> str:
    """Why a class whose pool does not zero new blocks is refused, and the fix.

    In such a pool a write smaller than a pool chunk leaves the rest of a
    newly mapped chunk as the disk had it: a thin volume can read a deleted
    volume's bytes, and neither a discard nor lvremove prevents that. Zeroing
    applies to every block mapped after it is turned on."""
    return (
        f"thin pool {pool.vg}/{pool.name} of device class {cls} does not zero new blocks, so a thin volume "
        f"could read a deleted volume's bytes; turn zeroing on with `lvchange --zero y {pool.vg}/{pool.name}`"
    )


class LvStore:
    """ELV's LVs in the configured device classes (there is no other state)."""

    def __init__(
        self, settings: LvmSettings, lvm: Lvm, runner: Runner, fs: FsTool, owner: str, *, make_nodes: bool
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.lvm = lvm
        self.fs = fs
        self.owner = owner
        self.make_nodes = make_nodes
        self.inv = Inventory(lvm, settings.vgs)
        self._reserved: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def lvm_tool(self, argv: list[str], timeout: float) -> None:
        """Run a non-lvm tool that changes a device (never killed on cancel)."""
        await self.runner.run(argv, timeout=timeout, mutating=True)

    # -- IDs ------------------------------------------------------------------------

    def oid(self, object_id: str, kind: ids.Kind) -> tuple[DeviceClass, ids.ObjectId] | None:
        """The class and parsed ID, or None for anything this driver did not issue."""
        oid = ids.parse(object_id, kind)
        if oid is None:
            return None
        cls = self.settings.classes.get(oid.pool)
        return (cls, oid) if cls is not None else None

    def class_of(self, lv: LvInfo) -> DeviceClass | None:
        oid = model.parse_lv_name(lv.name)
        cls = self.settings.classes.get(oid.pool) if oid else None
        return cls if cls is not None and cls.vg == lv.vg else None

    async def view(self, fresh: bool = False, reload: bool = False) -> View:
        return await self.inv.view(fresh, reload)

    # -- names ------------------------------------------------------------------------

    def named(self, view: View, kind: model.Kind, name: str) -> list[LvInfo]:
        """ELV's LVs of this kind that carry this CSI name (finished or
        half-made; never one being deleted), the oldest first. A new object's
        LV name comes from a fresh ID (csi.model.ids.new), so the name lives
        only in its tag; LVs made when names were hashed carry the tag too."""
        want = report.hex_encode(name)
        found = [
            lv
            for lv in view.all()
            if lv.tag(model.NAME) == want
            and lv.tag(model.KIND) == kind
            and model.owned(lv, self.owner)
            and not lv.has(model.WIPE)
            and self.class_of(lv) is not None
        ]
        return sorted(found, key=lambda lv: (int(lv.tag(model.CREATED) or 0), lv.name))

    def fresh(self, view: View, cls: DeviceClass, kind: ids.Kind, name: str) -> ids.ObjectId:
        """A new ID for an object called ``name`` whose LV name no LV in the class's VG has."""
        while True:
            oid = ids.new(kind, cls.name, name)
            if view.lv(cls.vg, model.lv_name(oid)) is None:
                return oid

    async def find(
        self, object_id: str, kind: model.Kind, fresh: bool = False, reload: bool = False
    ) -> tuple[DeviceClass, LvInfo, View] | None:
        """The live LV behind a volume or snapshot ID (ELV's, finished, not being wiped)."""
        parsed = self.oid(object_id, "v" if kind == "v" else "s")
        if parsed is None:
            return None
        cls, oid = parsed
        view = await self.view(fresh, reload)
        lv = view.lv(cls.vg, model.lv_name(oid))
        if lv is None or not model.live(lv, self.owner, kind):
            return None
        return cls, lv, view

    async def find_owned(self, object_id: str, kind: ids.Kind, *, reload: bool = False) -> tuple[LvInfo, View] | None:
        """The LV behind an ID if it is ELV's, whatever its state (a delete
        finishes what it finds), with the view it was found in."""
        parsed = self.oid(object_id, kind)
        if parsed is None:
            return None
        cls, oid = parsed
        view = await self.view(fresh=not reload, reload=reload)
        lv = view.lv(cls.vg, model.lv_name(oid))
        if lv is None or not model.owned(lv, self.owner):
            return None
        return lv, view

    async def must_find(self, volume_id: str, fresh: bool = False) -> tuple[DeviceClass, LvInfo, View]:
        found = await self.find(volume_id, "v", fresh)
        if found is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return found

    # -- the node's view of an LV ---------------------------------------------------

    async def activate(self, lv: LvInfo) -> Device:
        """Activate the LV (if needed) and wait, bounded, for its device node."""
        if lv.active and lv.major is not None and lv.minor is not None:
            return await devnode.wait_for_device(lv.major, lv.minor, make_nodes=self.make_nodes)
        # A COW snapshot is activated through its origin: LVM activates them
        # together, and asked for the snapshot itself it wants a y/n answer
        # on a terminal ("not changed", status 5, without one).
        head = lv.origin if lv.cow_snapshot and lv.origin else lv.name
        try:
            # -K: snapshots carry the activation-skip flag so boot-time
            # autoactivation leaves them alone; ELV activates them on purpose.
            # -y: no question is left (a COW snapshot is not asked for), and
            # with it the change may run in the lvm shell for changes.
            await self.lvm.change("lvchange", "-ay", "-K", "-y", f"{lv.vg}/{head}")
        finally:
            self.inv.invalidate()
        # The kernel knows the new device by its device-mapper name at once:
        # read major:minor from sysfs rather than asking lvs again.
        found = await asyncio.to_thread(devnode.find_dm_by_name, devnode.dm_name(lv.vg, lv.name))
        if found is None:
            view = await self.view(fresh=True)
            again = view.lv(lv.vg, lv.name)
            if again is None or not again.active or again.major is None or again.minor is None:
                raise FailedPrecondition(f"LV {lv.vg}/{lv.name} did not become active")
            return await devnode.wait_for_device(again.major, again.minor, make_nodes=self.make_nodes)
        return await devnode.wait_for_device(found[1], found[2], make_nodes=self.make_nodes)

    async def active_device(self, vg: str, name: str) -> Device | None:
        """The device of an LV the kernel has active (read from sysfs), or None."""
        found = await asyncio.to_thread(devnode.find_dm_by_name, devnode.dm_name(vg, name))
        if found is None:
            return None
        return await devnode.wait_for_device(found[1], found[2], make_nodes=self.make_nodes)

    async def deactivate(self, lv: LvInfo) -> None:
        """Deactivate the LV; InUse if it is open (LVM itself refuses then)."""
        if lv.active:
            try:
                # A COW snapshot would ask before taking its origin along:
                # no -y for one, so the answer stays no (it is never staged).
                yes = () if lv.cow_snapshot else ("-y",)
                await self.lvm.change("lvchange", "-an", *yes, f"{lv.vg}/{lv.name}")
            except CommandError as e:
                if report.still_open(e):
                    raise InUse(f"LV {lv.vg}/{lv.name} is still open on this node; unmount it first") from e
                raise
            finally:
                self.inv.invalidate()

    @staticmethod
    async def mounts_of(lv: LvInfo) -> list[Mount]:
        if not lv.active or lv.major is None or lv.minor is None:
            return []
        table = await asyncio.to_thread(MountTable.load)
        name = devnode.kernel_name(lv.major, lv.minor)
        found = table.of_device(lv.major, lv.minor)
        return found + (table.of_device_node(name) if name else [])

    # -- capacity -------------------------------------------------------------------

    @staticmethod
    def wipe_needed(view: View, lv: LvInfo) -> bool:
        """Thick LVs and COW snapshots are zeroed before removal; a thin LV never
        is. dm-thin has no cheap write-zeroes: zeroing a thin LV maps every one
        of its blocks, so deleting it would take its whole virtual size from the
        pool (and could fill it). A thin LV's blocks are returned by lvremove,
        and the next tenant reads zeros because ELV serves only pools that zero
        new blocks (zeroing_fix)."""
        return not lv.thin

    def available(self, view: View, cls: DeviceClass, copies: int = 1) -> int:
        space = view.vgs.get(cls.vg)
        if space is None:
            return 0
        reserved = self._reserved.get(cls.name, 0)
        if cls.thin_pool is not None:
            avail = cap.thin_class_available(
                view, cls.vg, cls.thin_pool, cls.overprovision_ratio, cls.full_threshold, reserved
            )
            return cap.round_down(avail, space.extent_size)
        return cap.thick_available(space.free, space.extent_size, reserved, copies)

    def extent(self, view: View, cls: DeviceClass) -> int:
        space = view.vgs.get(cls.vg)
        if space is None:
            raise Unavailable(f"volume group {cls.vg} of device class {cls.name} is missing")
        return space.extent_size

    def lv_size(self, view: View, cls: DeviceClass, spec: VolumeSpec) -> int:
        """The size of the LV for ``spec``: whole extents, and never past the
        request's limit (the spec forbids a volume larger than limit_bytes)."""
        extent = self.extent(view, cls)
        size = round_up(spec.size, extent)
        if spec.limit and size > spec.limit:
            raise OutOfRange(
                f"device class {cls.name} allocates in {extent}-byte extents: "
                f"{spec.size} bytes rounds up to {size}, past limit_bytes={spec.limit}"
            )
        return size

    @contextlib.asynccontextmanager
    async def reserve(self, cls: DeviceClass, size: int, what: str, copies: int = 1) -> AsyncIterator[None]:
        """Check that the class can promise ``size`` more bytes and hold them while
        the LVM change runs. Thin classes are checked here (LVM itself happily
        overcommits a pool); thick ones are also checked by lvcreate. The view
        is this RPC's, reloaded if anything changed since it was read."""
        lock = self._locks.setdefault(cls.name, asyncio.Lock())
        async with lock:
            view = await self.view(fresh=True)
            if cls.thin_pool is not None:
                pool = view.lv(cls.vg, cls.thin_pool)
                if pool is None or not pool.thin_pool:
                    raise Unavailable(f"thin pool {cls.vg}/{cls.thin_pool} of device class {cls.name} is missing")
                if pool.zero is not True:
                    raise FailedPrecondition(f"refusing {what}: {zeroing_fix(cls.name, pool)}")
            avail = self.available(view, cls, copies)
            if size > avail:
                raise ResourceExhausted(
                    f"device class {cls.name} can promise {avail} more bytes, not {size} for {what}"
                )
            self._reserved[cls.name] = self._reserved.get(cls.name, 0) + size * copies
        try:
            yield
        finally:
            self._reserved[cls.name] -= size * copies
            self.inv.invalidate()
