"""A volume's name and its ID: CreateVolume is idempotent by name while the
volume exists, a repeat must fit the request, and an ID names one volume for ever."""

from __future__ import annotations

import json
import os

import grpc

from csi.model import ids
from csi.v1 import csi_pb2
from tests.support.driver import Driver, MiB, leftovers
from tests.support.rpc import code_of, mount_cap


def create_req(name: str, required: int, limit: int = 0) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        volume_capabilities=[mount_cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
    )


def test_a_repeat_with_a_smaller_limit_is_already_exists(driver: Driver) -> None:
    vid = driver.create("limited", 64 * MiB)
    # The spec: a volume of this name larger than limit_bytes is not compatible.
    assert code_of(driver.controller.CreateVolume, create_req("limited", 32 * MiB, 48 * MiB)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    assert code_of(driver.controller.CreateVolume, create_req("limited", 32 * MiB, 64 * MiB - 1)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    # Within the limit (or none) it is the same volume.
    assert driver.controller.CreateVolume(create_req("limited", 32 * MiB, 64 * MiB)).volume.volume_id == vid
    assert driver.controller.CreateVolume(create_req("limited", 32 * MiB)).volume.volume_id == vid
    listed = [e.volume for e in driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries]
    assert [(v.volume_id, v.capacity_bytes) for v in listed] == [(vid, 64 * MiB)]
    driver.delete(vid)
    assert leftovers(driver.base) == []


def snapshot(d: Driver, name: str, vid: str) -> str:
    req = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=vid)
    return d.controller.CreateSnapshot(req).snapshot.snapshot_id


def snapshots_of(d: Driver, vid: str) -> list[str]:
    resp = d.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=vid))
    return [e.snapshot.snapshot_id for e in resp.entries]


def test_a_name_made_again_is_a_new_volume_with_a_new_id(driver: Driver) -> None:
    old = driver.create("data")
    old_snap = snapshot(driver, "data-monday", old)
    driver.delete(old)  # a loop snapshot is a copy: it outlives its source
    new = driver.create("data")
    assert new != old, "an ID must name one volume for ever"
    assert snapshots_of(driver, new) == [], "the old volume's snapshots are not the new one's"
    assert snapshots_of(driver, old) == [old_snap]
    get = csi_pb2.ControllerGetVolumeRequest(volume_id=old)
    assert code_of(driver.controller.ControllerGetVolume, get) == grpc.StatusCode.NOT_FOUND
    # A CO that still holds the old ID (a retried delete) deletes nothing of the new volume.
    driver.delete(old)
    image = os.path.join(driver.pool, "volumes", new + ".img")
    assert os.path.exists(image) and os.path.exists(image[:-4] + ".json")
    listed = [e.volume.volume_id for e in driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries]
    assert listed == [new]
    # While it exists the name finds it, across a restart too (the index is rebuilt from the metadata).
    driver.restart()
    assert driver.create("data") == new
    # A snapshot made again under its name is a new snapshot with a new ID.
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=old_snap))
    again = snapshot(driver, "data-monday", new)
    assert again != old_snap and snapshots_of(driver, new) == [again]
    got = csi_pb2.GetSnapshotRequest(snapshot_id=old_snap)
    assert code_of(driver.controller.GetSnapshot, got) == grpc.StatusCode.NOT_FOUND
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=again))
    driver.delete(new)
    assert sorted(os.listdir(os.path.join(driver.pool, "volumes"))) == []
    assert leftovers(driver.base) == []


def test_a_group_made_again_has_a_new_id(driver: Driver) -> None:
    a, b = driver.create("ga"), driver.create("gb")
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="nightly", source_volume_ids=[a, b])
    first = driver.group.CreateVolumeGroupSnapshot(req).group_snapshot
    driver.group.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=first.group_snapshot_id)
    )
    second = driver.group.CreateVolumeGroupSnapshot(req).group_snapshot
    assert second.group_snapshot_id != first.group_snapshot_id
    assert not {s.snapshot_id for s in second.snapshots} & {s.snapshot_id for s in first.snapshots}
    get = csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=first.group_snapshot_id)
    assert code_of(driver.group.GetVolumeGroupSnapshot, get) == grpc.StatusCode.NOT_FOUND
    # The repeat still finds it by name, also after a restart.
    driver.restart()
    assert driver.group.CreateVolumeGroupSnapshot(req).group_snapshot.group_snapshot_id == second.group_snapshot_id
    driver.group.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=second.group_snapshot_id)
    )
    driver.delete(a)
    driver.delete(b)
    assert leftovers(driver.base) == []


def test_a_pool_with_legacy_ids_keeps_working(driver: Driver) -> None:
    # Pools made when an ID was the hash of the name (csi.model.ids.legacy):
    # turn a volume and its snapshot into that form on disk, then restart.
    vid = driver.create("old-pvc")
    sid = snapshot(driver, "old-snap", vid)
    driver.stop()
    legacy_v, legacy_s = str(ids.legacy("v", "loop", "old-pvc")), str(ids.legacy("s", "loop", "old-snap"))
    for kind, old, new in (("volumes", vid, legacy_v), ("snapshots", sid, legacy_s)):
        d = os.path.join(driver.pool, kind)
        for f in os.listdir(d):
            os.rename(os.path.join(d, f), os.path.join(d, f.replace(old, new)))
        meta = os.path.join(d, new + ".json")
        with open(meta) as f:
            record = json.load(f)
        record["id"] = new
        if "source_volume_id" in record:
            record["source_volume_id"] = legacy_v
        with open(meta, "w") as f:
            json.dump(record, f)
    driver.start()
    assert driver.create("old-pvc") == legacy_v
    assert snapshot(driver, "old-snap", legacy_v) == legacy_s
    assert snapshots_of(driver, legacy_v) == [legacy_s]
    staging = driver.path("st", "old")
    driver.stage(legacy_v, staging)
    driver.unstage(legacy_v, staging)
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=legacy_s))
    driver.delete(legacy_v)
    # Made again, the name gets a new-style ID.
    fresh = driver.create("old-pvc")
    assert fresh != legacy_v and fresh[: len("v-loop-") + 16] == legacy_v[: len("v-loop-") + 16]
    driver.delete(fresh)
    assert leftovers(driver.base) == []
