"""The LVM backend's decisions, over an in-memory LVM (tests/support/fake_lvm.py): which LVM
commands each RPC runs, that repeats are safe, that foreign LVs are never
touched, that deletion quarantines and wipes, and that startup finishes
what a crash left. No root, no LVM."""

from __future__ import annotations

from typing import Any

import pytest

from csi.backend.lvm import devnode, wipe
from csi.backend.lvm.backend import LvmBackend
from csi.backend.lvm.report import hex_encode
from csi.errors import AlreadyExists, FailedPrecondition, InUse, NotFound, OutOfRange, ResourceExhausted
from csi.model import DEVICE_CLASS, AccessType, Device, Source, VolumeSpec, ids
from tests.support.fake_lvm import CLASSES, FakeLv, FakeLvm, GiB, MiB, backend_over

OWNER = "elv.owner=elv.csi.dev"
CONFIG = f"""
default-class = "thick"
udev = "off"
freeze-dir = "/nonexistent/elv-freeze"
{CLASSES}"""


@pytest.fixture(autouse=True)
def _no_device_nodes(monkeypatch: pytest.MonkeyPatch, lvm: FakeLvm) -> None:
    """sysfs and /dev as the fake LVM would make them."""

    def by_dm_name(name: str, *a: Any) -> tuple[str, int, int] | None:
        for lv in lvm.lvs.values():
            if lv.active and devnode.dm_name(lv.vg, lv.name) == name:
                return f"dm-{lv.minor}", 254, lv.minor
        return ("dm-99", 254, 99) if name.endswith("-cow") else None

    async def fake_wait(major: int, minor: int, **kw: Any) -> Device:
        return Device(f"dm-{minor}", f"/dev/dm-{minor}", major, minor)

    monkeypatch.setattr(devnode, "wait_for_device", fake_wait)
    monkeypatch.setattr(devnode, "kernel_name", lambda major, minor, *a: f"dm-{minor}")
    monkeypatch.setattr(devnode, "find_dm_by_name", by_dm_name)
    monkeypatch.setattr(devnode, "scan_dm_by_name", lambda name, *a: (by_dm_name(name), lvm.sysfs_sure))
    monkeypatch.setattr(wipe, "zero_out", lambda path: lvm.calls.append(("zero_out", path)))


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
    assert vol.id == str(ids.make("v", "thick", "pvc-1")) == backend.volume_id("pvc-1", {DEVICE_CLASS: "thick"})
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
    vid = backend.volume_id("pvc-x", {})
    lvm.add(FakeLv("elv-" + vid, "vg0", 64 * MiB, tags=["someone.else"]))
    backend.store.inv.invalidate()  # changed behind the driver's back
    assert await backend.get_volume(vid) is None
    with pytest.raises(AlreadyExists):
        await backend.create_volume(spec("pvc-x"))
    await backend.delete_volume(vid)
    await backend.delete_volume("v-thick-../../etc")
    assert lvm.changes() == []
    assert ("vg0", "elv-" + vid) in lvm.lvs


async def test_delete_thick_quarantines_then_wipes(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("d1"))
    before = len(lvm.calls)
    await backend.delete_volume(vol.id)
    (step,) = lvm.changes()[before - len(lvm.calls) :] if False else lvm.changes()[-1:]
    assert step[1:4] == ("lvchange", "--config", step[3]) and "elv.wipe" in step
    assert "elv.wipe" in lvm.lvs[("vg0", "elv-" + vol.id)].tags, "one tag is the commit point"
    assert await backend.get_volume(vol.id) is None
    # The CSI name is free again at once: the quarantined LV is renamed out of the way.
    again = await backend.create_volume(spec("d1"))
    quarantined = [lv for lv in lvm.lvs.values() if lv.name.startswith("elv-q-")]
    assert len(quarantined) == 1 and "elv.wipe" in quarantined[0].tags
    assert again.id == vol.id
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


async def test_delete_in_use_is_refused(backend: LvmBackend, lvm: FakeLvm) -> None:
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


async def test_expand_rounds_and_accepts_bigger(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("g"))
    grown = await backend.expand_volume(vol.id, 100 * MiB + 1)
    assert grown.size == 104 * MiB
    n = len(lvm.calls)
    assert (await backend.expand_volume(vol.id, 100 * MiB)).size == 104 * MiB
    assert all(c[1] in ("lvs", "vgs") for c in lvm.calls[n:])
    with pytest.raises(NotFound):
        await backend.expand_volume(backend.volume_id("nope", {}), GiB)


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
    assert (await backend.health(backend.volume_id("gone", {}))).abnormal
    await backend.delete_volume(vol.id)


async def test_node_lookups_of_an_inactive_volume_run_no_lvm(backend: LvmBackend, lvm: FakeLvm) -> None:
    """kubelet and csi-sanity unstage volumes that were never staged: the
    kernel's list of active disks answers that, without an lvs."""
    vol = await backend.create_volume(spec("idle", 64 * MiB, "thin"))
    lvm.lvs[("vg0", "elv-" + vol.id)].active = False  # as a reboot leaves it
    n = len(lvm.calls)
    assert await backend.find_device(vol.id) is None
    await backend.detach(vol.id)
    await backend.detach(backend.volume_id("never-made", {}))
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
    assert snap.id == backend.snapshot_id("snap-1", thin.id) and snap.source_volume_id == thin.id
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


async def test_growing_an_origin_finishes_its_deleted_snapshots(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("o"))
    snap = await backend.create_snapshot("o-snap", vol.id)
    await backend.delete_snapshot(snap.id)
    assert ("vg0", "elv-" + snap.id) in lvm.lvs, "deleted means quarantined; the wiper removes it later"
    grown = await backend.expand_volume(vol.id, 128 * MiB)
    assert grown.size == 128 * MiB and ("vg0", "elv-" + snap.id) not in lvm.lvs
    await backend.delete_volume(vol.id)


async def test_create_races_the_wiper_for_a_reused_name(backend: LvmBackend, lvm: FakeLvm) -> None:
    vol = await backend.create_volume(spec("reuse"))
    await backend.delete_volume(vol.id)
    # The wiper removes the quarantined LV just before the new create renames it.

    def vanished(args: list[str]) -> tuple[int, bytes, bytes]:
        lvm.lvs.pop((args[0], args[1]), None)
        return 5, b"", f'  Existing logical volume "{args[1]}" not found in volume group "{args[0]}"\n'.encode()

    lvm._lvrename = vanished  # type: ignore[method-assign]
    again = await backend.create_volume(spec("reuse"))
    assert again.id == vol.id


async def test_clone_of_a_thick_snapshot_whose_origin_is_inactive(
    backend: LvmBackend, lvm: FakeLvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The crash test found it on real LVM: the origin was unstaged (which
    # deactivates it and its snapshots), then a clone of the snapshot asked
    # lvchange to activate the snapshot itself, which LVM answers only on a
    # terminal; without one, "not changed" and INTERNAL.
    from csi.backend.lvm import clone as clone_mod

    copied: list[tuple[str, str, int]] = []
    monkeypatch.setattr(clone_mod, "copy_blocks", lambda src, dst, size, what: copied.append((src, dst, size)))
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
    from csi.backend.lvm import clone as clone_mod

    copied: list[tuple[str, str, int]] = []
    monkeypatch.setattr(clone_mod, "copy_blocks", lambda src, dst, size, what: copied.append((src, dst, size)))
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
