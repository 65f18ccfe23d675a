"""What LVM volumes promise about data: snapshots restore it, clones copy it,
growth keeps it, a deleted volume's bytes never reach the next tenant, a
crash mid-operation is cleaned up at restart, and LVs that are not ELV's are
never touched."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from csi.model import DEVICE_CLASS as CLASS
from csi.model import ids
from csi.v1 import csi_pb2
from tests.support.lvm import GuestVg, LvmDriver, MiB, lv, lvm, lvs, ours, wait_for
from tests.support.rpc import block_cap, code_of, mount_cap


def snapshot(d: LvmDriver, name: str, vid: str) -> str:
    req = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=vid)
    return d.controller.CreateSnapshot(req).snapshot.snapshot_id


def delete_snapshot(d: LvmDriver, sid: str) -> None:
    d.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))


def clone(d: LvmDriver, name: str, size: int, cls: str, *, snap: str = "", vol: str = "", cap: object = None) -> str:
    src = csi_pb2.VolumeContentSource()
    if snap:
        src.snapshot.snapshot_id = snap
    else:
        src.volume.volume_id = vol
    return d.create(name, size, cap or mount_cap(), parameters={CLASS: cls}, volume_content_source=src)  # type: ignore[arg-type]


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.parametrize("cls", ["thick", "thin"])
def test_snapshot_restore_keeps_data(driver: LvmDriver, vg: GuestVg, cls: str) -> None:
    vid = driver.create(f"snap-src-{cls}", 64 * MiB, parameters={CLASS: cls})
    st = driver.path("st", vid)
    driver.stage(vid, st)
    write(os.path.join(st, "data.txt"), "before the snapshot")
    # Taken while mounted: LVM freezes the filesystem around the snapshot.
    sid = snapshot(driver, f"snap-{cls}", vid)
    write(os.path.join(st, "data.txt"), "after the snapshot")
    restored = clone(driver, f"restored-{cls}", 96 * MiB, cls, snap=sid)
    rst = driver.path("st", restored)
    driver.stage(restored, rst)
    assert read(os.path.join(rst, "data.txt")) == "before the snapshot"
    assert os.statvfs(rst).f_blocks * os.statvfs(rst).f_frsize > 64 * MiB, "grown to the clone's size at stage"
    assert read(os.path.join(st, "data.txt")) == "after the snapshot"
    listed = driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=vid)).entries
    assert [e.snapshot.snapshot_id for e in listed] == [sid] and listed[0].snapshot.ready_to_use
    driver.unstage(restored, rst)
    driver.unstage(vid, st)
    # Unstaging the origin deactivated it (and a thick one's COW snapshot with
    # it): a restore must still work (the crash test found it did not, once).
    again = clone(driver, f"again-{cls}", 64 * MiB, cls, snap=sid)
    driver.stage(again, rst)
    assert read(os.path.join(rst, "data.txt")) == "before the snapshot"
    driver.unstage(again, rst)
    # Volumes and snapshots go in any order.
    driver.delete(vid)
    delete_snapshot(driver, sid)
    driver.delete(restored)
    driver.delete(again)


@pytest.mark.parametrize("cls", ["thick", "thin"])
def test_clone_of_a_volume_in_use(driver: LvmDriver, vg: GuestVg, cls: str) -> None:
    vid = driver.create(f"clone-src-{cls}", 64 * MiB, parameters={CLASS: cls})
    st = driver.path("st", vid)
    driver.stage(vid, st)
    write(os.path.join(st, "data.txt"), "cloned while mounted")
    copy = clone(driver, f"clone-{cls}", 64 * MiB, cls, vol=vid)
    cst = driver.path("st", copy)
    driver.stage(copy, cst)
    assert read(os.path.join(cst, "data.txt")) == "cloned while mounted"
    if cls == "thick":
        assert "copy elv-v-thick-" in driver.log() and ": done," in driver.log(), "a thick clone logs its copy"
    driver.unstage(copy, cst)
    driver.unstage(vid, st)
    driver.delete(copy)
    driver.delete(vid)


def test_cross_class_clone_copies(driver: LvmDriver, vg: GuestVg) -> None:
    vid = driver.create("xsrc", 32 * MiB, block_cap(), parameters={CLASS: "thin"})
    st, pub = driver.path("st", vid), driver.path("pub", vid)
    driver.stage(vid, st, block_cap())
    driver.publish(vid, st, pub, block_cap())
    with open(pub, "r+b") as f:
        f.write(b"thin to thick" * 100)
    driver.unpublish(vid, pub)
    driver.unstage(vid, st)
    copy = clone(driver, "xcopy", 32 * MiB, "thick", vol=vid, cap=block_cap())
    cst, cpub = driver.path("st", copy), driver.path("pub", copy)
    driver.stage(copy, cst, block_cap())
    driver.publish(copy, cst, cpub, block_cap())
    with open(cpub, "rb") as f:
        assert f.read(1300) == b"thin to thick" * 100
    driver.unpublish(copy, cpub)
    driver.unstage(copy, cst)
    driver.delete(copy)
    driver.delete(vid)


PATTERN = b"ELV-PREVIOUS-TENANT!" * 52428  # about 1 MiB


def test_deleted_thick_volume_is_wiped(driver: LvmDriver, vg: GuestVg) -> None:
    size = 32 * MiB
    vid = driver.create("tenant-a", size, block_cap(), parameters={CLASS: "thick"})
    st, pub = driver.path("st", vid), driver.path("pub", vid)
    driver.stage(vid, st, block_cap())
    driver.publish(vid, st, pub, block_cap())
    with open(pub, "r+b") as f:
        for _ in range(size // len(PATTERN)):
            f.write(PATTERN)
        os.fsync(f.fileno())
    driver.unpublish(vid, pub)
    driver.unstage(vid, st)
    driver.delete(vid)
    row = lv(vg.name, "elv-" + vid)
    assert row is None or "elv.wipe" in row["lv_tags"], "deleted means quarantined at once"
    wait_for(lambda: not ours(vg), 120, "the wipe")
    # The LV is gone once lvremove ends; the line follows the PVs' flush.
    wait_for(lambda: "wiped and removed" in driver.log(), 60, "the wiper's log line")
    # The next tenant gets the freed extents (LVM allocates the lowest free
    # ones first) and must read zeros there, not the pattern.
    nvid = driver.create("tenant-b", size, block_cap(), parameters={CLASS: "thick"})
    nst, npub = driver.path("st", nvid), driver.path("pub", nvid)
    driver.stage(nvid, nst, block_cap())
    driver.publish(nvid, nst, npub, block_cap())
    with open(npub, "rb") as f:
        data = f.read()
    assert len(data) >= size
    assert b"ELV-PREVIOUS-TENANT!" not in data
    driver.unpublish(nvid, npub)
    driver.unstage(nvid, nst)
    driver.delete(nvid)


def test_foreign_lvs_are_never_touched(driver: LvmDriver, vg: GuestVg) -> None:
    # An LV with exactly the name ELV once gave volume "intruder" (the hash of
    # the name: ids.legacy) and its name tag, but no owner tag.
    vid = str(ids.legacy("v", "thick", "intruder"))
    name = "elv-" + vid
    name_tag = "elv.name=" + b"intruder".hex()
    lvm("lvcreate", "-q", "-y", "-n", name, "-L", "8m", "--addtag", "someone.else", "--addtag", name_tag, vg.name)
    lvm("lvcreate", "-q", "-y", "-n", "admin-data", "-L", "8m", vg.name)
    made = ""
    try:
        # Not ELV's, so not the volume of that name: a new volume gets an LV of its own.
        made = driver.create("intruder", 8 * MiB, parameters={CLASS: "thick"})
        assert made != vid
        driver.delete(vid)
        listed = [e.volume.volume_id for e in driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries]
        assert made in listed and vid not in listed
        driver.restart()  # startup recovery must leave them alone too
        names = {r["lv_name"]: r for r in lvs(vg.name)}
        assert name in names and "admin-data" in names
        assert set(names[name]["lv_tags"].split(",")) == {"someone.else", name_tag}
        assert names["admin-data"]["lv_tags"] == ""
    finally:
        if made:
            driver.delete(made)
        lvm("lvremove", "-y", f"{vg.name}/{name}", f"{vg.name}/admin-data", check=False)


def test_restart_finishes_a_half_made_clone(driver: LvmDriver, vg: GuestVg) -> None:
    size = 512 * MiB
    vid = driver.create("big-src", size, block_cap(), parameters={CLASS: "thick"})
    src = csi_pb2.VolumeContentSource()
    src.volume.volume_id = vid
    req = csi_pb2.CreateVolumeRequest(
        name="big-clone",
        volume_capabilities=[block_cap()],
        parameters={CLASS: "thick"},
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_content_source=src,
    )
    future = driver.controller.CreateVolume.future(req)
    # Kill the driver as soon as the half-made clone exists (it is tagged pending).
    wait_for(lambda: any("elv.pending" in r["lv_tags"] for r in lvs(vg.name)), 120, "the pending clone")
    assert driver.proc is not None
    driver.proc.send_signal(signal.SIGKILL)
    driver.proc.wait()
    assert code_of(future.result) != grpc.StatusCode.OK
    assert any("elv.pending" in r["lv_tags"] for r in lvs(vg.name))
    driver.proc = None
    driver.close_channel()
    driver.start()
    # Startup quarantines the half-made LV (it holds part of the source) and wipes it.
    wait_for(lambda: not any("elv.pending" in r["lv_tags"] for r in lvs(vg.name)), 120, "recovery")
    assert "quarantining" in driver.log()
    # The retry now succeeds from scratch.
    vol = driver.controller.CreateVolume(req).volume
    assert vol.capacity_bytes >= size
    driver.delete(vol.volume_id)
    driver.delete(vid)


def test_restart_finishes_an_interrupted_wipe(driver: LvmDriver, vg: GuestVg) -> None:
    vid = driver.create("wipe-me", 512 * MiB, block_cap(), parameters={CLASS: "thick"})
    driver.delete(vid)
    assert driver.proc is not None
    driver.proc.send_signal(signal.SIGKILL)
    driver.proc.wait()
    driver.proc = None
    driver.close_channel()
    quarantined = [r for r in lvs(vg.name) if "elv.wipe" in r["lv_tags"]]
    driver.start()
    wait_for(lambda: not ours(vg), 120, "the wipe after restart")
    if quarantined:
        # The LV is gone once lvremove ends; the line follows the PVs' flush.
        wait_for(lambda: "wiped and removed" in driver.log(), 60, "the wiper's log line")


def test_group_snapshot_across_classes(driver: LvmDriver, vg: GuestVg) -> None:
    a = driver.create("grp-a", 64 * MiB, parameters={CLASS: "thick"})
    b = driver.create("grp-b", 64 * MiB, parameters={CLASS: "thin"})
    sa, sb = driver.path("st", a), driver.path("st", b)
    driver.stage(a, sa)
    driver.stage(b, sb)
    write(os.path.join(sa, "f"), "a1")
    write(os.path.join(sb, "f"), "b1")
    g = driver.group.CreateVolumeGroupSnapshot(
        csi_pb2.CreateVolumeGroupSnapshotRequest(name="grp", source_volume_ids=[a, b])
    ).group_snapshot
    assert len(g.snapshots) == 2 and g.ready_to_use
    assert "thawed" not in driver.log()
    write(os.path.join(sa, "f"), "a2")
    by_source = {s.source_volume_id: s.snapshot_id for s in g.snapshots}
    ra = clone(driver, "grp-ra", 64 * MiB, "thick", snap=by_source[a])
    rsa = driver.path("st", ra)
    driver.stage(ra, rsa)
    assert read(os.path.join(rsa, "f")) == "a1"
    driver.unstage(ra, rsa)
    driver.delete(ra)
    got = driver.group.GetVolumeGroupSnapshot(
        csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id)
    )
    assert got.group_snapshot.group_snapshot_id == g.group_snapshot_id
    driver.group.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id)
    )
    driver.unstage(a, sa)
    driver.unstage(b, sb)
    driver.delete(a)
    driver.delete(b)


@pytest.mark.parametrize(
    "params",
    [
        {"elv.csi.dev/lvm-type": "striped", "elv.csi.dev/lvm-stripes": "2", "elv.csi.dev/lvm-stripe-size": "64Ki"},
        {"elv.csi.dev/lvm-type": "raid1", "elv.csi.dev/lvm-mirrors": "1"},
    ],
    ids=["striped", "raid1"],
)
def test_layouts(driver: LvmDriver, vg: GuestVg, params: dict[str, str]) -> None:
    vid = driver.create("layout", 64 * MiB, parameters={CLASS: "thick", **params})
    row = lv(vg.name, "elv-" + vid)
    assert row is not None and row["segtype"] == params["elv.csi.dev/lvm-type"]
    st = driver.path("st", vid)
    driver.stage(vid, st)
    write(os.path.join(st, "f"), "laid out")
    grown = driver.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB)
        )
    )
    assert grown.capacity_bytes >= 128 * MiB
    driver.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(volume_id=vid, volume_path=st))
    assert read(os.path.join(st, "f")) == "laid out"
    driver.unstage(vid, st)
    driver.delete(vid)


def test_capacity_per_class(driver: LvmDriver, vg: GuestVg) -> None:
    def capacity(cls: str) -> int:
        return driver.controller.GetCapacity(csi_pb2.GetCapacityRequest(parameters={CLASS: cls})).available_capacity

    thin_before, thick_before = capacity("thin"), capacity("thick")
    assert 0 < thin_before <= 1024 * MiB
    assert thick_before > 0
    vid = driver.create("cap", 256 * MiB, parameters={CLASS: "thin"})
    time.sleep(1.1)  # past the report cache
    assert capacity("thin") == thin_before - 256 * MiB, "a thin volume promises its full size"
    assert capacity("thick") == thick_before, "thin volumes live in the pool, not in the VG's free space"
    other = csi_pb2.Topology(segments={"topology.elv.csi.dev/node": "elsewhere"})
    resp = driver.controller.GetCapacity(
        csi_pb2.GetCapacityRequest(parameters={CLASS: "thin"}, accessible_topology=other)
    )
    assert resp.available_capacity == 0
    assert (
        code_of(driver.create, "too-big", thin_before, parameters={CLASS: "thin"}) == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    driver.delete(vid)
