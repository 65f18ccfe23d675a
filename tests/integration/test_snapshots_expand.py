"""Snapshots, clones, group snapshots and online expansion on real devices."""

from __future__ import annotations

import os

import grpc

from csi.host.fs import CAP_SYS_RESOURCE, has_capability
from csi.v1 import csi_pb2
from tests.support.driver import Driver, MiB
from tests.support.rpc import block_cap, code_of, mount_cap

SnapSrc = csi_pb2.VolumeContentSource.SnapshotSource
VolSrc = csi_pb2.VolumeContentSource.VolumeSource


def snapshot(d: Driver, name: str, vid: str) -> csi_pb2.Snapshot:
    return d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=vid)).snapshot


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_snapshot_of_mounted_volume_and_restore(driver: Driver) -> None:
    vid = driver.create("src", 64 * MiB)
    staging = driver.path("st", "src")
    driver.stage(vid, staging)
    write(os.path.join(staging, "before"), "v1")
    snap = snapshot(driver, "snap1", vid)
    assert snap.ready_to_use and snap.size_bytes == 64 * MiB and snap.source_volume_id == vid
    # Repeat: same snapshot. Same name, other volume: ALREADY_EXISTS.
    assert snapshot(driver, "snap1", vid).snapshot_id == snap.snapshot_id
    other = driver.create("other", 64 * MiB)
    assert code_of(snapshot, driver, "snap1", other) == grpc.StatusCode.ALREADY_EXISTS
    # The volume stays writable (thawed) after the snapshot.
    write(os.path.join(staging, "after"), "v2")

    src = csi_pb2.VolumeContentSource(snapshot=SnapSrc(snapshot_id=snap.snapshot_id))
    restored = driver.create("restored", 128 * MiB, volume_content_source=src)
    rst = driver.path("st", "restored")
    driver.stage(restored, rst)
    assert read(os.path.join(rst, "before")) == "v1"
    assert not os.path.exists(os.path.join(rst, "after")), "the snapshot is a point in time"
    st = os.statvfs(rst)
    assert st.f_blocks * st.f_frsize > 100 * MiB, "the restored filesystem grew to the bigger volume"
    driver.unstage(restored, rst)

    # A volume smaller than its source is OUT_OF_RANGE; a missing source NOT_FOUND.
    small = csi_pb2.CreateVolumeRequest(
        name="small",
        volume_capabilities=[mount_cap()],
        volume_content_source=src,
        capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB),
    )
    assert code_of(driver.controller.CreateVolume, small) == grpc.StatusCode.OUT_OF_RANGE
    gone = csi_pb2.VolumeContentSource(snapshot=SnapSrc(snapshot_id="s-loop-" + "0" * 32))
    req = csi_pb2.CreateVolumeRequest(name="x", volume_capabilities=[mount_cap()], volume_content_source=gone)
    assert code_of(driver.controller.CreateVolume, req) == grpc.StatusCode.NOT_FOUND

    driver.unstage(vid, staging)
    for v in (vid, other, restored):
        driver.delete(v)
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert os.listdir(os.path.join(driver.pool, "snapshots")) == []


def test_clone_from_volume(driver: Driver) -> None:
    vid = driver.create("orig", 64 * MiB)
    staging = driver.path("st", "orig")
    driver.stage(vid, staging)
    write(os.path.join(staging, "f"), "cloned")
    driver.unstage(vid, staging)
    src = csi_pb2.VolumeContentSource(volume=VolSrc(volume_id=vid))
    clone = driver.create("clone", 64 * MiB, volume_content_source=src)
    resp = driver.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=clone))
    assert resp.volume.content_source.volume.volume_id == vid
    cst = driver.path("st", "clone")
    driver.stage(clone, cst)
    assert read(os.path.join(cst, "f")) == "cloned"
    driver.unstage(clone, cst)
    # A mount volume cannot be cloned into a block one.
    req = csi_pb2.CreateVolumeRequest(name="blk", volume_capabilities=[block_cap()], volume_content_source=src)
    assert code_of(driver.controller.CreateVolume, req) == grpc.StatusCode.FAILED_PRECONDITION
    driver.delete(clone)
    driver.delete(vid)


def test_group_snapshot(driver: Driver) -> None:
    a, b = driver.create("ga"), driver.create("gb")
    sa, sb = driver.path("st", "ga"), driver.path("st", "gb")
    driver.stage(a, sa)
    driver.stage(b, sb)
    write(os.path.join(sa, "f"), "a")
    write(os.path.join(sb, "f"), "b")
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="grp", source_volume_ids=[a, b])
    g = driver.group.CreateVolumeGroupSnapshot(req).group_snapshot
    assert g.ready_to_use and sorted(s.source_volume_id for s in g.snapshots) == sorted([a, b])
    assert driver.group.CreateVolumeGroupSnapshot(req).group_snapshot.group_snapshot_id == g.group_snapshot_id
    member = g.snapshots[0].snapshot_id
    # Members are deleted through their group only.
    assert code_of(driver.controller.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id=member)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    got = driver.group.GetVolumeGroupSnapshot(
        csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id)
    )
    assert len(got.group_snapshot.snapshots) == 2
    driver.unstage(a, sa)
    driver.unstage(b, sb)
    driver.group.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id)
    )
    assert os.listdir(os.path.join(driver.pool, "snapshots")) == []
    assert (
        code_of(
            driver.group.GetVolumeGroupSnapshot,
            csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id),
        )
        == grpc.StatusCode.NOT_FOUND
    )
    driver.delete(a)
    driver.delete(b)


def expand(d: Driver, vid: str, size: int, path: str) -> int:
    r = d.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=size))
    )
    assert r.capacity_bytes == size and r.node_expansion_required
    n = d.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=path, capacity_range=csi_pb2.CapacityRange(required_bytes=size)
        )
    )
    return n.capacity_bytes


def test_online_expand_xfs(driver: Driver) -> None:
    cap = mount_cap("xfs")
    vid = driver.create("grow-xfs", 320 * MiB, cap)
    staging, target = driver.path("st", "gx"), driver.path("t", "gx")
    os.makedirs(os.path.dirname(target))
    driver.stage(vid, staging, cap)
    driver.publish(vid, staging, target, cap)
    write(os.path.join(target, "f"), "kept")
    before = os.statvfs(target)
    assert expand(driver, vid, 640 * MiB, target) == 640 * MiB
    after = os.statvfs(target)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + 250 * MiB
    assert read(os.path.join(target, "f")) == "kept"
    # Shrinking is a no-op that reports the current size.
    r = driver.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=MiB))
    )
    assert r.capacity_bytes == 640 * MiB
    driver.unpublish(vid, target)
    driver.unstage(vid, staging)
    driver.delete(vid)


def test_expand_ext4(driver: Driver) -> None:
    vid = driver.create("grow-ext4", 64 * MiB)
    staging = driver.path("st", "ge")
    driver.stage(vid, staging)
    write(os.path.join(staging, "f"), "kept")
    r = driver.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB)
        )
    )
    assert r.capacity_bytes == 128 * MiB
    node_req = csi_pb2.NodeExpandVolumeRequest(volume_id=vid, volume_path=staging)
    if has_capability(CAP_SYS_RESOURCE):
        driver.node.NodeExpandVolume(node_req)
    else:
        # The kernel's ext4 resize ioctl needs CAP_SYS_RESOURCE; this machine's
        # root lacks it. The driver says so instead of failing obscurely...
        assert code_of(driver.node.NodeExpandVolume, node_req) == grpc.StatusCode.FAILED_PRECONDITION
        assert "CAP_SYS_RESOURCE" in driver.log()
        # ...and grows the filesystem offline at the next stage.
        driver.unstage(vid, staging)
        driver.stage(vid, staging)
    st = os.statvfs(staging)
    assert st.f_blocks * st.f_frsize > 100 * MiB, "grown from 64 MiB"
    assert read(os.path.join(staging, "f")) == "kept"
    driver.unstage(vid, staging)
    driver.delete(vid)


def test_expand_block(driver: Driver) -> None:
    cap = block_cap()
    vid = driver.create("grow-blk", 16 * MiB, cap)
    staging, target = driver.path("st", "gb"), driver.path("t", "gb")
    os.makedirs(os.path.dirname(target))
    driver.stage(vid, staging, cap)
    driver.publish(vid, staging, target, cap)
    assert expand(driver, vid, 48 * MiB, target) == 48 * MiB
    fd = os.open(target, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == 48 * MiB
    finally:
        os.close(fd)
    driver.unpublish(vid, target)
    driver.unstage(vid, staging)
    driver.delete(vid)


def test_node_only_expansion_grows_the_volume(base: str) -> None:
    """With --node-expansion-only (the DaemonSet's mode) NodeExpandVolume grows the
    backing file itself, and ControllerGetCapabilities no longer offers EXPAND_VOLUME."""
    d = Driver(base, "--node-expansion-only").start()
    try:
        caps = d.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest()).capabilities
        assert csi_pb2.ControllerServiceCapability.RPC.EXPAND_VOLUME not in {c.rpc.type for c in caps}
        cap = mount_cap("xfs")
        vid = d.create("node-grow", 320 * MiB, cap)
        staging, target = d.path("st", "ng"), d.path("t", "ng")
        os.makedirs(os.path.dirname(target))
        d.stage(vid, staging, cap)
        d.publish(vid, staging, target, cap)
        r = d.node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(
                volume_id=vid, volume_path=target, capacity_range=csi_pb2.CapacityRange(required_bytes=640 * MiB)
            )
        )
        assert r.capacity_bytes == 640 * MiB
        assert os.stat(os.path.join(d.pool, "volumes", vid + ".img")).st_size == 640 * MiB
        st = os.statvfs(target)
        assert st.f_blocks * st.f_frsize > 560 * MiB
        got = d.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid)).volume
        assert got.capacity_bytes == 640 * MiB, "the volume's recorded size follows"
        d.unpublish(vid, target)
        d.unstage(vid, staging)
        d.delete(vid)
    finally:
        assert d.stop() == 0
