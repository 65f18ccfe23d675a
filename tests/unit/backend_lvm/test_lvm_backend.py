"""The LVM backend's decisions, over an in-memory LVM (tests/support/fake_lvm.py): which LVM
commands each RPC runs, that repeats are safe, that foreign LVs are never
touched, that deletion quarantines and wipes, and that startup finishes
what a crash left. No root, no LVM."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from csi.backend.lvm import backend as backend_mod
from csi.backend.lvm import wipe
from csi.backend.lvm.backend import LvmBackend
from csi.backend.lvm.report import hex_encode
from csi.config import Config
from csi.errors import AlreadyExists, FailedPrecondition, InUse, NotFound, OutOfRange, ResourceExhausted
from csi.model import DEVICE_CLASS, AccessType, Source, VolumeSpec, ids
from csi.services.controller import ControllerService
from csi.services.gate import Gate
from csi.v1 import csi_pb2
from tests.support.fake_lvm import CONFIG, OWNER, FakeLv, FakeLvm, GiB, MiB, backend_over, fake_sysfs


@pytest.fixture(autouse=True)
def _no_device_nodes(monkeypatch: pytest.MonkeyPatch, lvm: FakeLvm) -> None:
    fake_sysfs(monkeypatch, lvm)


@pytest.fixture
def lvm() -> FakeLvm:
    r = FakeLvm()
    r.add(FakeLv("pool0", "vg0", 2 * GiB, "thin-pool", data_percent=0.0, metadata_percent=5.0))
    return r


@pytest.fixture
async def backend(lvm: FakeLvm) -> LvmBackend:
    b = backend_over(lvm, CONFIG)
    from csi.backend.lvm.recovery import recover

    await recover(b.store, b.wiper)
    return b


def spec(name: str, size: int = 64 * MiB, cls: str = "thick", **kw: Any) -> VolumeSpec:
    fields: dict[str, Any] = {"access": AccessType.MOUNT, "fs_type": "ext4", "parameters": {DEVICE_CLASS: cls}}
    fields.update(kw)
    return VolumeSpec(name=name, size=size, **fields)


def lvcreates(lvm: FakeLvm) -> list[tuple[str, ...]]:
    return [c for c in lvm.calls if c[:2] == ("lvm", "lvcreate")]


async def test_create_thick_is_idempotent_and_tagged(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("pvc-1", 63 * MiB))
    oid = ids.parse(vol.id, "v")
    assert oid is not None and oid.pool == "thick" and oid.may_be_named("pvc-1")
    assert vol.size == 64 * MiB, "rounded up to whole extents"
    (argv,) = lvcreates(lvm)
    assert "--config" in argv and "udev_sync=0" in argv[argv.index("--config") + 1]
    assert list(argv[argv.index("-W") : argv.index("-W") + 4]) == ["-W", "y", "-Z", "y"]
    lv = lvm.lvs[("vg0", "elv-" + vol.id)]
    assert OWNER in lv.tags and f"elv.name={hex_encode('pvc-1')}" in lv.tags and "elv.size=66060288" in lv.tags
    again = await backend.create_volume(spec("pvc-1", 63 * MiB))
    assert again == vol and len(lvcreates(lvm)) == 1
    with pytest.raises(AlreadyExists):
        await backend.create_volume(spec("pvc-1", 128 * MiB))
    with pytest.raises(AlreadyExists):
        await backend.create_volume(spec("pvc-1", 63 * MiB, fs_type="xfs"))
    assert [v.id for v in await backend.list_volumes()] == [vol.id]


async def test_limit_bytes_holds_for_repeats_and_extent_rounding(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("pvc-1", 63 * MiB))
    assert vol.size == 64 * MiB
    # A repeat whose limit the (extent-rounded) volume exceeds is not the same request.
    with pytest.raises(AlreadyExists, match="limit_bytes"):
        await backend.create_volume(spec("pvc-1", 63 * MiB, limit=63 * MiB))
    assert await backend.create_volume(spec("pvc-1", 63 * MiB, limit=64 * MiB)) == vol
    # A new volume is never made larger than its limit by extent rounding (4 MiB here).
    with pytest.raises(OutOfRange, match="limit_bytes"):
        await backend.create_volume(spec("pvc-2", 5 * MiB, limit=5 * MiB))
    with pytest.raises(OutOfRange, match="limit_bytes"):
        await backend.create_volume(spec("pvc-3", 65 * MiB, limit=65 * MiB, source=Source("volume", vol.id)))
    assert len(lvcreates(lvm)) == 1
    assert (await backend.create_volume(spec("pvc-2", 4 * MiB, limit=5 * MiB))).size == 4 * MiB


async def test_hostile_names_never_reach_lvm(backend: LvmBackend, lvm: FakeLvm) -> None:
    name = "-rf /; $(reboot) é\n"
    vol = await backend.create_volume(spec(name))
    (argv,) = lvcreates(lvm)
    assert not any(name in a or "reboot" in a for a in argv)
    assert vol.name == name


async def test_thin_capacity_is_enforced_before_lvcreate(backend: LvmBackend, lvm: FakeLvm) -> None:
    cap = await backend.capacity({DEVICE_CLASS: "thin"})
    assert cap.available == 2 * GiB  # ratio 1: pool size, nothing promised yet
    await backend.create_volume(spec("a", GiB, "thin"))
    assert (await backend.capacity({DEVICE_CLASS: "thin"})).available == GiB
    with pytest.raises(ResourceExhausted):
        await backend.create_volume(spec("b", GiB + MiB, "thin"))
    assert len(lvcreates(lvm)) == 1
    # The thick class answers with the VG's free space, not the pool's.
    thick = await backend.capacity({})
    assert thick.available == lvm.free("vg0") // (4 * MiB) * 4 * MiB


async def test_thick_no_space_is_resource_exhausted(backend: LvmBackend, lvm: FakeLvm) -> None:
    with pytest.raises(ResourceExhausted):
        await backend.create_volume(spec("huge", 20 * GiB))


async def test_foreign_lv_is_never_touched(backend: LvmBackend, lvm: FakeLvm) -> None:
    vid = str(ids.legacy("v", "thick", "pvc-x"))
    # Named as ELV once named pvc-x's LV, and even carrying its name tag, but not ELV's.
    tag = f"elv.name={hex_encode('pvc-x')}"
    lvm.add(FakeLv("elv-" + vid, "vg0", 64 * MiB, tags=["someone.else", tag, "elv.kind=v"]))
    lvm.add(FakeLv("elv-v-thick-" + "5" * 32, "vg0", 64 * MiB, tags=["elv.owner=other.driver", tag, "elv.kind=v"]))
    backend.store.inv.invalidate()  # changed behind the driver's back
    assert await backend.get_volume(vid) is None
    await backend.delete_volume(vid)
    await backend.delete_volume("v-thick-../../etc")
    assert lvm.changes() == []
    # The name is not taken by them: a new volume gets an LV of its own.
    made = await backend.create_volume(spec("pvc-x"))
    assert made.id != vid and [c[1] for c in lvm.changes()] == ["lvcreate"]
    assert lvm.lvs[("vg0", "elv-" + vid)].tags == ["someone.else", tag, "elv.kind=v"]
    assert [v.id for v in await backend.list_volumes()] == [made.id]


async def test_delete_thick_quarantines_then_wipes(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("d1"))
    before = len(lvm.calls)
    await backend.delete_volume(vol.id)
    (step,) = lvm.changes()[before - len(lvm.calls) :] if False else lvm.changes()[-1:]
    assert step[1:4] == ("lvchange", "--config", step[3]) and "elv.wipe" in step
    assert "elv.wipe" in lvm.lvs[("vg0", "elv-" + vol.id)].tags, "one tag is the commit point"
    assert await backend.get_volume(vol.id) is None
    # The CSI name is free again at once, for a new volume with a new ID; the
    # deleted LV waits for the wiper untouched.
    n = len(lvm.calls)
    again = await backend.create_volume(spec("d1"))
    assert again.id != vol.id
    assert [c[1] for c in lvm.changes()[-1:]] == ["lvcreate"] and "lvrename" not in lvm.commands()[n:]
    assert "elv.wipe" in lvm.lvs[("vg0", "elv-" + vol.id)].tags
    await backend.wiper.pass_once()
    after = lvm.commands()[before:]
    assert "blkdiscard" in after and after.index("blkdiscard") < len(after) - 1 - after[::-1].index("lvremove")
    assert not [lv for lv in lvm.lvs.values() if lv.name.startswith("elv-q-")]
    await backend.delete_volume(again.id)
    await backend.delete_volume(again.id)


async def test_delete_thin_in_zeroing_pool_just_removes(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("t1", 64 * MiB, "thin"))
    await backend.delete_volume(vol.id)
    assert lvm.changes()[-1][1] == "lvremove"
    assert "blkdiscard" not in lvm.commands()


async def test_delete_in_use_is_refused(backend: LvmBackend, lvm: FakeLvm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_mod, "OPEN_GRACE", 0.3)
    vol = await backend.create_volume(spec("busy"))
    lv = lvm.lvs[("vg0", "elv-" + vol.id)]
    lv.open = True
    backend.store.inv.invalidate()
    with pytest.raises(InUse):
        await backend.delete_volume(vol.id)
    lv.open = False
    backend.store.inv.invalidate()
    await backend.set_attachment(vol.id, "node-a", True)
    assert (await backend.get_volume(vol.id)).attachments == {"node-a": True}  # type: ignore[union-attr]
    with pytest.raises(InUse):
        await backend.delete_volume(vol.id)
    await backend.set_attachment(vol.id, "node-a", None)
    await backend.delete_volume(vol.id)


async def test_delete_waits_out_a_passing_open(backend: LvmBackend, lvm: FakeLvm) -> None:
    """Open and mounted nowhere (udev's blkid after a snapshot of it): the
    delete waits for the probe to end instead of refusing."""
    vol = await backend.create_volume(spec("probed"))
    lv = lvm.lvs[("vg0", "elv-" + vol.id)]
    lv.open = True
    backend.store.inv.invalidate()

    async def probe_ends() -> None:
        await asyncio.sleep(0.5)
        lv.open = False

    ending = asyncio.ensure_future(probe_ends())
    await backend.delete_volume(vol.id)
    await ending
    key = ("vg0", "elv-" + vol.id)
    assert key not in lvm.lvs or any(t.startswith("elv.wipe") for t in lvm.lvs[key].tags)  # removed, or quarantined


async def test_expand_rounds_and_accepts_bigger(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("g"))
    grown = await backend.expand_volume(vol.id, 100 * MiB + 1)
    assert grown.size == 104 * MiB
    n = len(lvm.calls)
    assert (await backend.expand_volume(vol.id, 100 * MiB)).size == 104 * MiB
    assert all(c[1] in ("lvs", "vgs") for c in lvm.calls[n:])
    with pytest.raises(NotFound):
        await backend.expand_volume(str(ids.new("v", "thick", "nope")), GiB)


async def test_node_attach_detach_and_formatted(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("n", 64 * MiB, "thin"))
    lv = lvm.lvs[("vg0", "elv-" + vol.id)]
    lv.active = False
    backend.store.inv.invalidate()  # changed behind the driver's back
    assert await backend.find_device(vol.id) is None
    dev = await backend.attach(vol.id)
    assert lv.active and dev.path == f"/dev/dm-{lv.minor}"
    assert (await backend.find_device(vol.id)) == dev
    await backend.mark_formatted(vol.id, "ext4", complete=False)
    assert (await backend.get_volume(vol.id)).formatting == "ext4"  # type: ignore[union-attr]
    await backend.mark_formatted(vol.id, "ext4")
    got = await backend.get_volume(vol.id)
    assert got is not None and got.formatted == "ext4" and got.formatting is None
    assert not (await backend.health(vol.id)).abnormal
    await backend.detach(vol.id)
    await backend.detach(vol.id)
    assert not lv.active
    assert "not attached" in (await backend.health(vol.id)).message
    assert not (await backend.health(vol.id, node=False)).abnormal
    assert (await backend.health(str(ids.new("v", "thin", "gone")))).abnormal
    await backend.delete_volume(vol.id)


async def test_node_lookups_of_an_inactive_volume_run_no_lvm(backend: LvmBackend, lvm: FakeLvm) -> None:
    """kubelet and csi-sanity unstage volumes that were never staged: the
    kernel's list of active disks answers that, without an lvs."""
    vol = await backend.create_volume(spec("idle", 64 * MiB, "thin"))
    lvm.lvs[("vg0", "elv-" + vol.id)].active = False  # as a reboot leaves it
    n = len(lvm.calls)
    assert await backend.find_device(vol.id) is None
    await backend.detach(vol.id)
    await backend.detach(str(ids.new("v", "thin", "never-made")))
    assert lvm.calls[n:] == []
    # Active: the report confirms it is ELV's, and the device is the kernel's.
    dev = await backend.attach(vol.id)
    backend.store.inv.invalidate()
    assert await backend.find_device(vol.id) == dev
    await backend.detach(vol.id)
    assert not lvm.lvs[("vg0", "elv-" + vol.id)].active
    # sysfs could not be read for sure (a device torn down meanwhile): ask LVM.
    lvm.sysfs_sure = False
    n = len(lvm.calls)
    assert await backend.find_device(vol.id) is None
    await backend.detach(vol.id)
    assert [c[1] for c in lvm.calls[n:]] == ["lvs"]
    await backend.delete_volume(vol.id)


async def test_pool_nearly_full_is_abnormal(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("full", 64 * MiB, "thin"))
    lvm.lvs[("vg0", "pool0")].metadata_percent = 95.0
    backend.store.inv.invalidate()
    h = await backend.health(vol.id)
    assert h.abnormal and "metadata" in h.message
    assert (await backend.capacity({DEVICE_CLASS: "thin"})).available == 0


async def test_snapshots_and_clones(backend: LvmBackend, lvm: FakeLvm) -> None:
    thin = await backend.create_volume(spec("src", 64 * MiB, "thin"))
    snap = await backend.create_snapshot("snap-1", thin.id)
    sid = ids.parse(snap.id, "s")
    assert sid is not None and sid.pool == "thin" and sid.may_be_named("snap-1")
    assert snap.source_volume_id == thin.id
    assert (await backend.create_snapshot("snap-1", thin.id)) == snap
    with pytest.raises(AlreadyExists):
        await backend.create_snapshot("snap-1", (await backend.create_volume(spec("other", 64 * MiB, "thin"))).id)
    slv = lvm.lvs[("vg0", "elv-" + snap.id)]
    assert slv.skip and slv.segtype == "thin"
    # A thin clone of a thin snapshot is one lvcreate -s; bigger means lvextend, then unmark.
    n = len(lvm.calls)
    clone = await backend.create_volume(spec("c", 128 * MiB, "thin", source=Source("snapshot", snap.id)))
    made = [c[1] for c in lvm.changes() if lvm.calls.index(c) >= n]
    assert made == ["lvcreate", "lvextend", "lvchange"]
    clv = lvm.lvs[("vg0", "elv-" + clone.id)]
    assert clv.origin == slv.name and "elv.pending" not in clv.tags and not clv.skip
    assert clone.source == Source("snapshot", snap.id)
    with pytest.raises(OutOfRange):
        await backend.create_volume(spec("small", 32 * MiB, "thin", source=Source("snapshot", snap.id)))
    with pytest.raises(FailedPrecondition):
        await backend.create_volume(spec("x", 64 * MiB, "thin", source=Source("snapshot", snap.id), fs_type="xfs"))
    with pytest.raises(NotFound):
        await backend.create_volume(spec("y", 64 * MiB, "thin", source=Source("snapshot", "s-thin-" + "0" * 32)))
    await backend.delete_snapshot(snap.id)
    await backend.delete_snapshot(snap.id)
    assert await backend.list_snapshots() == []


async def test_thick_snapshot_is_cow_sized_by_reserve(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("t", 400 * MiB, parameters={"elv.csi.dev/lvm-snapshot-reserve": "25%"}))
    snap = await backend.create_snapshot("s", vol.id)
    slv = lvm.lvs[("vg0", "elv-" + snap.id)]
    assert slv.origin == "elv-" + vol.id and 100 * MiB <= slv.size <= 112 * MiB
    # Deleting the origin first: it is quarantined but waits for its snapshot.
    await backend.delete_volume(vol.id)
    assert (await backend.wiper.pass_once())[0] == 1
    await backend.delete_snapshot(snap.id)
    await backend.wiper.pass_once()
    await backend.wiper.pass_once()
    assert [lv.name for lv in lvm.lvs.values()] == ["pool0"]
    # The snapshot's exception store (its -cow device) is what was zeroed, and the origin.
    zeroed = [c[-1] for c in lvm.calls if c[0] in ("zero_out", "blkdiscard")]
    assert zeroed == ["/dev/dm-99", f"/dev/dm-{zeroed[1][8:]}"] and len(zeroed) == 2


async def test_startup_quarantines_half_made(lvm: FakeLvm) -> None:
    lvm.add(FakeLv("elv-v-thick-" + "1" * 32, "vg0", 64 * MiB, tags=[OWNER, "elv.kind=v", "elv.pending"]))
    lvm.add(FakeLv("elv-t-" + "2" * 32, "vg0", 64 * MiB, tags=[OWNER, "elv.kind=t"]))
    lvm.add(FakeLv("foreign", "vg0", 64 * MiB, tags=["elv.pending"]))
    b = backend_over(lvm, CONFIG)
    from csi.backend.lvm.recovery import recover

    await recover(b.store, b.wiper)
    names = sorted(lv.name for lv in lvm.lvs.values())
    assert names[0] == "elv-q-" + names[0][6:] and names[1].startswith("elv-q-") and "foreign" in names
    await b.wiper.pass_once()
    assert sorted(lv.name for lv in lvm.lvs.values()) == ["foreign", "pool0"], [
        (lv.name, lv.tags) for lv in lvm.lvs.values()
    ]


async def test_missing_vg_refuses_to_start(lvm: FakeLvm) -> None:
    from csi.backend.lvm.recovery import recover
    from csi.errors import Unavailable

    b = backend_over(lvm, CONFIG.replace('vg = "vg0"\n[[device-class]]', 'vg = "vgX"\n[[device-class]]'))
    with pytest.raises(Unavailable):
        await recover(b.store, b.wiper)


async def test_group_snapshot(backend: LvmBackend, lvm: FakeLvm) -> None:
    a = await backend.create_volume(spec("ga", 64 * MiB, "thin"))
    b = await backend.create_volume(spec("gb", 64 * MiB))
    g = await backend.create_group_snapshot("grp", [b.id, a.id])
    assert sorted(s.source_volume_id for s in g.snapshots) == sorted([a.id, b.id])
    assert all(s.group_id == g.id for s in g.snapshots)
    assert (await backend.create_group_snapshot("grp", [a.id, b.id])).id == g.id
    with pytest.raises(AlreadyExists):
        await backend.create_group_snapshot("grp", [a.id])
    assert (await backend.get_group_snapshot(g.id)) is not None
    await backend.delete_group_snapshot(g.id)
    assert await backend.get_group_snapshot(g.id) is None
    # Made again under its name, the group and its snapshots get new IDs.
    again = await backend.create_group_snapshot("grp", [a.id, b.id])
    assert again.id != g.id and await backend.get_group_snapshot(g.id) is None
    assert not {s.id for s in again.snapshots} & {s.id for s in g.snapshots}
    await backend.delete_group_snapshot(again.id)


async def test_growing_an_origin_finishes_its_deleted_snapshots(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("o"))
    snap = await backend.create_snapshot("o-snap", vol.id)
    await backend.delete_snapshot(snap.id)
    assert ("vg0", "elv-" + snap.id) in lvm.lvs, "deleted means quarantined; the wiper removes it later"
    grown = await backend.expand_volume(vol.id, 128 * MiB)
    assert grown.size == 128 * MiB and ("vg0", "elv-" + snap.id) not in lvm.lvs
    await backend.delete_volume(vol.id)


async def test_a_name_made_again_is_a_new_volume_with_a_new_id(backend: LvmBackend, lvm: FakeLvm) -> None:
    old = await backend.create_volume(spec("reuse", 64 * MiB, "thin"))
    snap = await backend.create_snapshot("reuse-snap", old.id)
    await backend.delete_volume(old.id)
    new = await backend.create_volume(spec("reuse", 64 * MiB, "thin"))
    assert new.id != old.id, "an ID must name one volume for ever"
    assert await backend.get_volume(old.id) is None
    # A CO that still holds the old ID deletes nothing of the new volume.
    n = len(lvm.changes())
    await backend.delete_volume(old.id)
    assert lvm.changes()[n:] == []
    assert await backend.get_volume(new.id) == new
    # The old volume's snapshot is not the new one's.
    assert [s.source_volume_id for s in await backend.list_snapshots()] == [old.id]
    assert await backend.create_volume(spec("reuse", 64 * MiB, "thin")) == new, "the name still finds it"
    # A snapshot made again under its name gets a new ID too.
    await backend.delete_snapshot(snap.id)
    again = await backend.create_snapshot("reuse-snap", new.id)
    assert again.id != snap.id and await backend.get_snapshot(snap.id) is None
    assert again.source_volume_id == new.id


async def test_lvs_made_with_legacy_ids_keep_them(lvm: FakeLvm) -> None:
    # LVs from before IDs were unique are named by the hash of the CSI name.
    # They keep that ID; the name tag finds them; a repeat create returns them.
    from csi.backend.lvm import model
    from csi.backend.lvm.recovery import recover

    old_spec = spec("old-pvc", 64 * MiB)
    vid = ids.legacy("v", "thick", "old-pvc")
    lvm.add(FakeLv(model.lv_name(vid), "vg0", 64 * MiB, tags=model.volume_tags("elv.csi.dev", old_spec, 5)))
    sid = ids.legacy("s", "thick", "old-snap")
    made = await backend_over_recovered(lvm)
    vol = await made.create_volume(old_spec)
    assert vol.id == str(vid) and [c[1] for c in lvm.changes()] == []
    lvm.add(
        FakeLv(
            model.lv_name(sid),
            "vg0",
            64 * MiB,
            origin=model.lv_name(vid),
            tags=model.snapshot_tags("elv.csi.dev", "old-snap", vol, 6),
        )
    )
    made.store.inv.invalidate()
    assert (await made.create_snapshot("old-snap", vol.id)).id == str(sid)
    assert [v.id for v in await made.list_volumes()] == [str(vid)]
    await recover(made.store, made.wiper)  # a restart changes nothing of them
    assert (await made.get_volume(str(vid))) == vol


async def backend_over_recovered(lvm: FakeLvm) -> LvmBackend:
    from csi.backend.lvm.recovery import recover

    b = backend_over(lvm, CONFIG)
    await recover(b.store, b.wiper)
    return b


async def test_one_name_is_one_volume_across_classes(backend: LvmBackend, lvm: FakeLvm) -> None:
    thick = await backend.create_volume(spec("one", 64 * MiB, "thick"))
    with pytest.raises(AlreadyExists, match="device class thick"):
        await backend.create_volume(spec("one", 64 * MiB, "thin"))
    assert [v.id for v in await backend.list_volumes()] == [thick.id]
    # A pool from before names were looked up by tag may hold the name in two
    # classes: each class's request keeps finding its own.
    from csi.backend.lvm import model

    twin = ids.legacy("v", "thin", "one")
    twin_spec = spec("one", 64 * MiB, "thin")
    lvm.add(
        FakeLv(
            model.lv_name(twin),
            "vg0",
            64 * MiB,
            "thin",
            pool="pool0",
            tags=model.volume_tags("elv.csi.dev", twin_spec, 9),
        )
    )
    backend.store.inv.invalidate()
    assert (await backend.create_volume(twin_spec)).id == str(twin)
    assert (await backend.create_volume(spec("one", 64 * MiB, "thick"))).id == thick.id


async def test_a_half_made_lv_of_the_name_is_quarantined_by_the_next_create(backend: LvmBackend, lvm: FakeLvm) -> None:
    from csi.backend.lvm import model

    left = ids.new("v", "thick", "half")
    tags = model.volume_tags("elv.csi.dev", spec("half"), 3, pending=True)
    lvm.add(FakeLv(model.lv_name(left), "vg0", 64 * MiB, tags=tags))
    backend.store.inv.invalidate()
    vol = await backend.create_volume(spec("half"))
    assert vol.id != str(left)
    assert "elv.wipe" in lvm.lvs[("vg0", model.lv_name(left))].tags
    assert [v.id for v in await backend.list_volumes()] == [vol.id]


def copied_blocks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    """Block copies the backend asks for, as (source, target, size), none made."""
    from csi.backend.lvm import clone as clone_mod

    copied: list[tuple[str, str, int]] = []
    monkeypatch.setattr(clone_mod, "copy_blocks", lambda src, dst, size, what, **kw: copied.append((src, dst, size)))
    return copied


async def test_clone_of_a_thick_snapshot_whose_origin_is_inactive(
    backend: LvmBackend, lvm: FakeLvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The crash test found it on real LVM: the origin was unstaged (which
    # deactivates it and its snapshots), then a clone of the snapshot asked
    # lvchange to activate the snapshot itself, which LVM answers only on a
    # terminal; without one, "not changed" and INTERNAL.
    copied = copied_blocks(monkeypatch)
    vol = await backend.create_volume(spec("origin", 64 * MiB))
    snap = await backend.create_snapshot("s", vol.id)
    origin = lvm.lvs[("vg0", "elv-" + vol.id)]
    slv = lvm.lvs[("vg0", "elv-" + snap.id)]
    origin.active = slv.active = False
    backend.store.inv.invalidate()
    n = len(lvm.calls)
    made = await backend.create_volume(spec("restored", 64 * MiB, source=Source("snapshot", snap.id)))
    activations = [c for c in lvm.calls[n:] if c[:2] == ("lvm", "lvchange") and "-ay" in c]
    assert [c[-1] for c in activations][:1] == ["vg0/elv-" + vol.id], "the snapshot is activated through its origin"
    assert len(copied) == 1 and copied[0][2] == 64 * MiB
    assert made.source == Source("snapshot", snap.id)
    assert "elv.pending" not in lvm.lvs[("vg0", "elv-" + made.id)].tags


# -- thin pools: deletes never allocate, pools that do not zero, full pools, copies (issue 15) ----


def pool(lvm: FakeLvm) -> FakeLv:
    return lvm.lvs[("vg0", "pool0")]


def zeroing(lvm: FakeLvm) -> list[tuple[str, ...]]:
    return [c for c in lvm.calls if c[0] in ("blkdiscard", "zero_out")]


@pytest.mark.parametrize("zero", [True, False])
async def test_deleting_thin_lvs_never_zeroes_them(backend: LvmBackend, lvm: FakeLvm, zero: bool) -> None:
    # Zeroing a thin LV maps its whole virtual size in the pool: a delete must
    # never do it, whatever the pool's zeroing (turned off here after startup).
    vol = await backend.create_volume(spec("t", 256 * MiB, "thin"))
    snap = await backend.create_snapshot("t-snap", vol.id)
    half = lvm.add(FakeLv("elv-v-thin-" + "3" * 32, "vg0", 64 * MiB, "thin", [OWNER, "elv.kind=v"], "pool0"))
    pool(lvm).zero = zero
    backend.store.inv.invalidate()
    n = len(lvm.calls)
    await backend.delete_volume(vol.id)
    await backend.delete_snapshot(snap.id)
    from csi.backend.lvm import report

    lv = next(x for x in (await backend.store.view(fresh=True)).all() if x.name == half.name)
    assert isinstance(lv, report.LvInfo)
    await backend.wiper.quarantine(lv)  # a half-made thin clone, as startup finds it
    await backend.wiper.pass_once()
    assert zeroing(lvm) == []
    assert [lv.name for lv in lvm.lvs.values()] == ["pool0"]
    assert "lvremove" in [c[1] for c in lvm.changes()[n - len(lvm.calls) :]]


async def test_a_pool_that_does_not_zero_is_refused_at_startup(lvm: FakeLvm) -> None:
    from csi.backend.lvm.recovery import recover
    from csi.errors import ConfigError

    pool(lvm).zero = False
    b = backend_over(lvm, CONFIG)
    with pytest.raises(
        ConfigError, match=r"device class thin: .*does not zero new blocks.*lvchange --zero y vg0/pool0"
    ):
        await recover(b.store, b.wiper)


async def test_a_pool_that_stops_zeroing_makes_nothing_new(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("z", 64 * MiB, "thin"))
    pool(lvm).zero = False
    backend.store.inv.invalidate()
    n = len(lvcreates(lvm))
    fix = r"lvchange --zero y vg0/pool0"
    with pytest.raises(FailedPrecondition, match=fix):
        await backend.create_volume(spec("z2", 64 * MiB, "thin"))
    with pytest.raises(FailedPrecondition, match=fix):
        await backend.create_volume(spec("z3", 64 * MiB, "thin", source=Source("volume", vol.id)))
    with pytest.raises(FailedPrecondition, match=fix):
        await backend.expand_volume(vol.id, 128 * MiB)
    assert len(lvcreates(lvm)) == n
    await backend.create_volume(spec("thick-still-works", 64 * MiB))  # the thick class is not affected
    pool(lvm).zero = True
    backend.store.inv.invalidate()
    await backend.create_volume(spec("z2", 64 * MiB, "thin"))


@pytest.mark.parametrize(
    ("health", "data", "meta", "when_full", "words"),
    [
        (
            "out_of_data",
            100.0,
            12.5,
            "queue",
            ["out of data space", "data 100.0%", "metadata 12.5%", "block", "ENOSPC"],
        ),
        ("out_of_data", 100.0, 12.5, "error", ["out of data space", "fail at once with ENOSPC"]),
        ("metadata_read_only", 40.0, 100.0, "queue", ["read-only metadata", "metadata 100.0%", "fail"]),
        ("failed", 40.0, 5.0, "queue", ["has failed", "data 40.0%"]),
        ("", 92.0, 5.0, "queue", ["nearly full", "data 92.0%", "metadata 5.0%", "block", "then fail with ENOSPC"]),
        ("", 10.0, 91.0, "error", ["nearly full", "metadata 91.0%", "fail at once with ENOSPC"]),
    ],
)
async def test_a_full_pool_is_reported(
    backend: LvmBackend, lvm: FakeLvm, health: str, data: float, meta: float, when_full: str, words: list[str]
) -> None:
    vol = await backend.create_volume(spec("f", 64 * MiB, "thin"))
    thick = await backend.create_volume(spec("k", 64 * MiB))
    before = (await backend.capacity({DEVICE_CLASS: "thin"})).available
    assert before > 0 and not (await backend.health(vol.id, node=False)).abnormal
    p = pool(lvm)
    p.health, p.data_percent, p.metadata_percent, p.when_full = health, data, meta, when_full
    backend.store.inv.invalidate()
    h = await backend.health(vol.id, node=False)
    assert h.abnormal and all(w in h.message for w in words), h.message
    assert "thin pool vg0/pool0" in h.message
    assert (await backend.capacity({DEVICE_CLASS: "thin"})).available == 0
    with pytest.raises(ResourceExhausted):
        await backend.create_volume(spec("f2", 64 * MiB, "thin"))
    assert not (await backend.health(thick.id, node=False)).abnormal, "thick volumes do not live in the pool"
    # Space freed (or the pool extended): the condition and the capacity come back.
    p.health, p.data_percent, p.metadata_percent = "", 20.0, 5.0
    backend.store.inv.invalidate()
    assert not (await backend.health(vol.id, node=False)).abnormal
    assert (await backend.capacity({DEVICE_CLASS: "thin"})).available > 0


async def test_attr_alone_marks_a_pool_out_of_space() -> None:
    # lvs may show the pool's state in lv_attr while its percentages are unknown.
    from csi.backend.lvm import capacity, report

    (p,) = [lv for lv in report.parse_lvs(FakeLvm_report_of_pool()) if lv.thin_pool]
    assert p.data_percent is None and p.attr[8] == "D"
    why = capacity.pool_condition(p, 90.0)
    assert why is not None and "out of data space" in why and "data unknown" in why


def FakeLvm_report_of_pool() -> str:
    import json

    row = {
        "lv_name": "pool0",
        "vg_name": "vg0",
        "lv_size": str(GiB),
        "lv_attr": "twi-aotzD-",
        "segtype": "thin-pool",
        "zero": "zero",
        "data_percent": "",
        "metadata_percent": "",
    }
    return json.dumps({"report": [{"lv": [row]}]})


def copier(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    from csi.backend.lvm import clone as clone_mod

    copied: list[dict[str, Any]] = []

    def fake(src: str, dst: str, size: int, what: str, **kw: Any) -> int:
        copied.append({"src": src, "dst": dst, "size": size, **kw})
        return 0

    monkeypatch.setattr(clone_mod, "copy_blocks", fake)
    return copied


async def test_a_copy_into_a_thin_pool_checks_its_room_first(
    backend: LvmBackend, lvm: FakeLvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied = copier(monkeypatch)
    src = await backend.create_volume(spec("thick-src", 256 * MiB))
    # 2 GiB pool at 80 %: 204.8 MiB below the 90 % threshold, less than the 256 MiB a
    # thick source may write (the class itself still promises its ratio's worth).
    pool(lvm).data_percent = 80.0
    backend.store.inv.invalidate()
    assert (await backend.capacity({DEVICE_CLASS: "thin"})).available >= 256 * MiB
    n = len(lvcreates(lvm))
    with pytest.raises(ResourceExhausted, match=r"thin pool vg0/pool0 .* may write 268435456"):
        await backend.create_volume(spec("into-thin", 256 * MiB, "thin", source=Source("volume", src.id)))
    assert len(lvcreates(lvm)) == n and copied == [], "refused before anything was made"
    pool(lvm).data_percent = 50.0
    backend.store.inv.invalidate()
    made = await backend.create_volume(spec("into-thin", 256 * MiB, "thin", source=Source("volume", src.id)))
    assert copied[-1]["sparse"] == 64 * 1024, "a fresh thin LV in a zeroing pool: zero chunks are skipped"
    assert backend.cloner._copying == {"thin": 0}
    # Into a thick class every byte is written (its extents may hold anything).
    await backend.create_volume(spec("into-thick", 256 * MiB, source=Source("volume", made.id)))
    assert copied[-1]["sparse"] == 0


async def test_copies_in_flight_count_against_the_pool(lvm: FakeLvm, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two thin pools: a thin source's mapped share (its data%) bounds what its copy
    # writes, and copies running at once share the target pool's room.
    import asyncio
    import threading

    from csi.backend.lvm import clone as clone_mod
    from csi.backend.lvm.recovery import recover

    # pool1: 1 GiB at 40 %, so 512 MiB of room below the 90 % threshold: one copy fits, not two.
    lvm.add(FakeLv("pool1", "vg0", 1 * GiB, "thin-pool", data_percent=40.0, metadata_percent=5.0))
    b = backend_over(
        lvm, CONFIG + '[[device-class]]\nname = "other"\nvg = "vg0"\nthin-pool = "pool1"\noverprovision-ratio = 4.0\n'
    )
    await recover(b.store, b.wiper)
    src = await b.create_volume(spec("big-thin", 2 * GiB, "thin"))
    lvm.lvs[("vg0", "elv-" + src.id)].data_percent = 20.0  # about 410 MiB mapped of 2 GiB
    b.store.inv.invalidate()
    release = threading.Event()
    started = threading.Event()

    def slow(src_path: str, dst: str, size: int, what: str, **kw: Any) -> int:
        started.set()
        release.wait(10)
        return 0

    monkeypatch.setattr(clone_mod, "copy_blocks", slow)
    first = asyncio.ensure_future(b.create_volume(spec("c1", 2 * GiB, "other", source=Source("volume", src.id))))
    while not started.is_set() and not first.done():
        await asyncio.sleep(0.01)
    assert not first.done(), first.exception()
    assert 409 * MiB <= b.cloner._copying["other"] <= 410 * MiB
    with pytest.raises(ResourceExhausted, match="copies in flight"):
        await b.create_volume(spec("c2", 2 * GiB, "other", source=Source("volume", src.id)))
    release.set()
    await first
    assert b.cloner._copying["other"] == 0


async def test_stopping_the_backend_stops_a_wipe_running_in_a_thread(
    backend: LvmBackend, lvm: FakeLvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A COW store is zeroed in a worker thread. Stopping the driver cancelled the
    # wiper but not the thread, and the interpreter's exit then waited for it.
    import asyncio
    import threading
    import time

    from csi.host.stoppable import Stopped

    started, ended = threading.Event(), threading.Event()

    def slow_zero(path: str, stop: threading.Event | None = None) -> None:
        started.set()
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if stop is not None and stop.is_set():
                    raise Stopped("stopped")
                time.sleep(0.01)
        finally:
            ended.set()

    monkeypatch.setattr(wipe, "zero_out", slow_zero)
    vol = await backend.create_volume(spec("cow-origin"))
    snap = await backend.create_snapshot("cow", vol.id)
    await backend.delete_snapshot(snap.id)
    backend.wiper.start()
    for _ in range(500):
        if started.is_set():
            break
        await asyncio.sleep(0.01)
    assert started.is_set()
    await backend.stop()
    assert ended.is_set(), "the zeroing thread still runs after stop()"
    assert ("vg0", "elv-" + snap.id) in lvm.lvs, "cut off: it stays quarantined, to be wiped at the next start"


async def test_a_new_mount_volume_is_staged_with_one_lvchange(backend: LvmBackend, lvm: FakeLvm) -> None:
    """Born with the intent to format (lvcreate's own tags), so the stage's
    intent record costs nothing and only the result is one lvchange."""
    vol = await backend.create_volume(spec("fresh", fs_type=""))
    lv = lvm.lvs[("vg0", "elv-" + vol.id)]
    assert "elv.formatting=ext4" in lv.tags and vol.formatting == "ext4"  # the default filesystem
    got = await backend.get_volume(vol.id)
    assert got is not None and got.formatting == "ext4" and got.formatted is None
    n = len(lvm.changes())
    await backend.mark_formatted(vol.id, "ext4", complete=False)
    assert lvm.changes()[n:] == []
    await backend.mark_formatted(vol.id, "ext4")
    (change,) = lvm.changes()[n:]
    assert change[:2] == ("lvm", "lvchange")
    assert "elv.formatted=ext4" in change and "elv.formatting=ext4" in change  # added, and deleted
    assert lv.tags.count("elv.formatted=ext4") == 1 and "elv.formatting=ext4" not in lv.tags


async def test_only_empty_mount_volumes_are_born_with_the_intent(backend: LvmBackend, lvm: FakeLvm) -> None:
    block = await backend.create_volume(spec("raw", access=AccessType.BLOCK, fs_type=""))
    assert not any(t.startswith("elv.formatting") for t in lvm.lvs[("vg0", "elv-" + block.id)].tags)
    xfs = await backend.create_volume(spec("x", fs_type="xfs", cls="thin"))
    assert "elv.formatting=xfs" in lvm.lvs[("vg0", "elv-" + xfs.id)].tags
    # A clone holds its source's data: it is never born "being formatted".
    snap = await backend.snaps.create("s", xfs.id)
    clone = await backend.create_volume(spec("c", fs_type="xfs", cls="thin", source=Source("snapshot", snap.id)))
    tags = lvm.lvs[("vg0", "elv-" + clone.id)].tags
    assert not any(t.startswith("elv.formatting") for t in tags)


@pytest.mark.parametrize("cls", ["thick", "thin"])
async def test_expand_reads_the_report_once(backend: LvmBackend, lvm: FakeLvm, cls: str) -> None:
    """One lvs to decide, one lvextend; the grown size is what lvextend was told
    (whole extents), not read back with a second report."""
    vol = await backend.create_volume(spec("e", cls=cls))
    n = len(lvm.calls)
    grown = await backend.expand_volume(vol.id, 100 * MiB + 1)
    assert [c[1] for c in lvm.calls[n:]] == ["lvs", "lvextend"]
    assert grown.size == 104 * MiB == lvm.lvs[("vg0", "elv-" + vol.id)].size
    got = await backend.get_volume(vol.id)
    assert got is not None and got.size == 104 * MiB  # a later report agrees


@pytest.mark.parametrize("cls", ["thick", "thin"])
async def test_controller_expand_rpc_reads_the_report_once(
    backend: LvmBackend, lvm: FakeLvm, config: Config, cls: str
) -> None:
    """The whole RPC, service included: the size check and the growth share one
    report (the service once read its own, before the volume's lock)."""
    vol = await backend.create_volume(spec("e", cls=cls))
    service = ControllerService(config, backend, Gate())
    n = len(lvm.calls)
    req = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.id, capacity_range=csi_pb2.CapacityRange(required_bytes=100 * MiB + 1)
    )
    resp = await service.ControllerExpandVolume(req, None)  # type: ignore[arg-type]
    assert [c[1] for c in lvm.calls[n:]] == ["lvs", "lvextend"]
    assert resp.capacity_bytes == 104 * MiB and resp.node_expansion_required
    n = len(lvm.calls)
    again = await service.ControllerExpandVolume(req, None)  # type: ignore[arg-type]
    assert again.capacity_bytes == 104 * MiB
    assert [c[1] for c in lvm.calls[n:]] == ["lvs"], "a repeat only looks"


async def test_a_thin_clone_reads_the_report_once(backend: LvmBackend, lvm: FakeLvm) -> None:
    src = await backend.create_volume(spec("src", 64 * MiB, "thin"))
    snap = await backend.create_snapshot("s", src.id)
    n = len(lvm.calls)
    clone = await backend.create_volume(spec("c", 64 * MiB, "thin", source=Source("snapshot", snap.id)))
    assert [c[1] for c in lvm.calls[n:]] == ["lvs", "lvcreate"]
    # What it answered without asking is what a report says.
    backend.store.inv.invalidate()
    assert clone == await backend.get_volume(clone.id)


async def test_a_thick_clone_finds_its_new_lv_in_sysfs(
    backend: LvmBackend, lvm: FakeLvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied = copied_blocks(monkeypatch)
    vol = await backend.create_volume(spec("origin", 64 * MiB))
    snap = await backend.create_snapshot("s", vol.id)
    n = len(lvm.calls)
    made = await backend.create_volume(spec("copy", 64 * MiB, source=Source("snapshot", snap.id)))
    # One report to decide; the copy's target is found by its device-mapper name.
    assert [c[1] for c in lvm.calls[n:]] == ["lvs", "lvcreate", "lvchange"]
    target = lvm.lvs[("vg0", "elv-" + made.id)]
    assert copied == [(f"/dev/dm-{lvm.lvs[('vg0', 'elv-' + snap.id)].minor}", f"/dev/dm-{target.minor}", 64 * MiB)]
    backend.store.inv.invalidate()
    assert made == await backend.get_volume(made.id)


@pytest.mark.parametrize("cls", ["thick", "thin"])
async def test_a_new_volume_is_active_so_its_stage_runs_no_lvchange(
    backend: LvmBackend, lvm: FakeLvm, cls: str
) -> None:
    """Thin LVs are left active by lvcreate, as thick ones must be (-Z y): the
    first stage finds the device in sysfs and activates nothing."""
    vol = await backend.create_volume(spec("a", cls=cls))
    assert lvm.lvs[("vg0", "elv-" + vol.id)].active
    n = len(lvm.calls)
    dev = await backend.attach(vol.id)
    assert dev.path == f"/dev/dm-{lvm.lvs[('vg0', 'elv-' + vol.id)].minor}"
    assert [c[1] for c in lvm.calls[n:]] == ["lvs"]


@pytest.mark.parametrize("cls", ["thick", "thin"])
async def test_one_rpc_reads_the_report_once_even_when_it_outlasts_the_ttl(
    backend: LvmBackend, lvm: FakeLvm, cls: str
) -> None:
    """Under emulation one lvs takes longer than the view's ttl. NodeStage's
    lookups (the volume, its device, the attach) still share the view their
    RPC loaded; the next RPC, a new task, reads LVM again."""
    vol = await backend.create_volume(spec("slow", cls=cls))
    backend.store.inv._ttl = 0.0  # every shared view is already too old

    async def stage() -> None:
        assert await backend.get_volume(vol.id) is not None
        dev = await backend.find_device(vol.id)
        assert dev is not None and dev == await backend.attach(vol.id)

    n = len(lvm.calls)
    await asyncio.create_task(stage())
    assert [c[1] for c in lvm.calls[n:]] == ["lvs"]
    n = len(lvm.calls)
    await asyncio.create_task(stage())
    assert [c[1] for c in lvm.calls[n:]] == ["lvs"]  # a new RPC does not reuse the last one's view
