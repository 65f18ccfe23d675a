"""Whole lives of thick and thin volumes on real LVM: create, stage, write,
publish, grow online, unstage, delete; and the codes the contract promises."""

from __future__ import annotations

import errno
import os
import stat
import subprocess

import grpc
import pytest

from csi.model import DEVICE_CLASS as CLASS
from csi.v1 import csi_pb2
from tests.support import observe
from tests.support.lvm import GuestVg, LvmDriver, MiB, lv
from tests.support.rpc import block_cap, code_of, mount_cap


def lv_name(vid: str) -> str:
    return "elv-" + vid


@pytest.mark.parametrize(("cls", "fs"), [("thick", "ext4"), ("thin", "xfs")])
def test_mount_life(driver: LvmDriver, vg: GuestVg, cls: str, fs: str) -> None:
    size = 320 * MiB if fs == "xfs" else 64 * MiB
    vid = driver.create("life-" + cls, size, mount_cap(fs), parameters={CLASS: cls})
    assert vid.startswith(f"v-{cls}-")
    row = lv(vg.name, lv_name(vid))
    assert row is not None and int(row["lv_size"]) >= size
    assert ("V" if cls == "thin" else "-") == row["lv_attr"][0]
    staging, target = driver.path("st", vid), driver.path("pub", vid)
    driver.stage(vid, staging, mount_cap(fs))
    driver.publish(vid, staging, target, mount_cap(fs))
    with open(os.path.join(target, "hello.txt"), "w") as f:
        f.write("hello lvm")
    # Online growth: the controller grows the LV, the node the filesystem.
    grown = driver.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=size + 100 * MiB)
        )
    )
    assert grown.capacity_bytes >= size + 100 * MiB
    node = driver.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=target, capacity_range=csi_pb2.CapacityRange(required_bytes=size + 100 * MiB)
        )
    )
    assert node.capacity_bytes >= size + 100 * MiB
    st = os.statvfs(target)
    assert st.f_blocks * st.f_frsize > size
    # A staged volume cannot be deleted.
    assert code_of(driver.delete, vid) == grpc.StatusCode.FAILED_PRECONDITION
    stats = driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target))
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    driver.unpublish(vid, target)
    driver.unstage(vid, staging)
    row = lv(vg.name, lv_name(vid))
    assert row is not None and row["lv_attr"][4] == "-", "unstage deactivates the LV"
    # Another filesystem than the one on the LV: refused before anything is
    # activated or mounted, and the data is kept.
    other = "xfs" if fs == "ext4" else "ext4"
    assert code_of(driver.stage, vid, staging, mount_cap(other)) == grpc.StatusCode.FAILED_PRECONDITION
    row = lv(vg.name, lv_name(vid))
    assert row is not None and row["lv_attr"][4] == "-", "a refused stage leaves the LV inactive"
    assert not os.path.ismount(staging)
    # Restage: the data is still there (never reformatted).
    driver.stage(vid, staging, mount_cap(fs))
    with open(os.path.join(staging, "hello.txt")) as f:
        assert f.read() == "hello lvm"
    driver.unstage(vid, staging)
    driver.delete(vid)
    driver.delete(vid)  # idempotent


@pytest.mark.parametrize(("cls", "fs"), [("thick", "ext4"), ("thin", "xfs")])
def test_grow_through_a_read_only_publish(driver: LvmDriver, vg: GuestVg, cls: str, fs: str) -> None:
    """NodeExpandVolume given a read-only publish as its path: that mount
    cannot grow a filesystem (EROFS), so the driver grows it through the
    volume's staging mount, and every mount shows the new size."""
    size = 320 * MiB if fs == "xfs" else 64 * MiB
    vid = driver.create("rogrow-" + cls, size, mount_cap(fs), parameters={CLASS: cls})
    staging, rw, ro = driver.path("st", vid), driver.path("pub", vid), driver.path("pub", vid + "-ro")
    driver.stage(vid, staging, mount_cap(fs))
    driver.publish(vid, staging, rw, mount_cap(fs))
    driver.publish(vid, staging, ro, mount_cap(fs), readonly=True)
    with open(os.path.join(rw, "kept.txt"), "w") as f:
        f.write("kept")
    # What a filesystem shows is its size less its log and metadata (xfs's log
    # alone may be 64 MiB; ext4's new groups bring their own inode tables, 7 of
    # the 100 MiB here): compare with what it showed before.
    before = {p: os.statvfs(p).f_blocks * os.statvfs(p).f_frsize for p in (staging, rw, ro)}
    want = csi_pb2.CapacityRange(required_bytes=size + 100 * MiB)
    driver.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(volume_id=vid, capacity_range=want))
    node = driver.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(volume_id=vid, volume_path=ro, capacity_range=want)
    )
    assert node.capacity_bytes >= size + 100 * MiB
    for path in (staging, rw, ro):
        st = os.statvfs(path)
        assert st.f_blocks * st.f_frsize >= before[path] + 80 * MiB, f"{path} shows the old size"
    with open(os.path.join(ro, "kept.txt")) as f:
        assert f.read() == "kept"
    for target in (ro, rw):
        driver.unpublish(vid, target)
    driver.unstage(vid, staging)
    driver.delete(vid)


def test_block_life(driver: LvmDriver, vg: GuestVg) -> None:
    vid = driver.create("blk", 32 * MiB, block_cap(), parameters={CLASS: "thin"})
    staging, target, ro = driver.path("st", vid), driver.path("pub", vid), driver.path("pub", vid + "-ro")
    driver.stage(vid, staging, block_cap())
    row = lv(vg.name, lv_name(vid))
    assert row is not None and row["lv_attr"][4] == "a", "stage activates the LV"
    major, minor = int(row["lv_kernel_major"]), int(row["lv_kernel_minor"])
    dm = f"/dev/dm-{minor}"
    # The stage is a bind of the LV's node inside the staging directory.
    (marker,) = observe.mounts_under(staging)
    assert marker.fstype == "devtmpfs" and marker.root == f"/dm-{minor}"
    driver.publish(vid, staging, target, block_cap())
    st = os.stat(target)
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor)
    with open(target, "r+b") as f:
        f.seek(4096)
        f.write(b"raw bytes")
        f.flush()
        os.fsync(f.fileno())
    with open(dm, "rb") as f:
        f.seek(4096)
        assert f.read(9) == b"raw bytes", "a write to the target reached the LV"
    # A read-only publish beside it: the kernel refuses writes, the LV keeps its bytes.
    driver.publish(vid, staging, ro, block_cap(), readonly=True)
    assert [v.readonly for v in observe.loops_over(dm)] == [True], "one read-only view of the LV"
    with pytest.raises(OSError) as ei, open(ro, "r+b") as f:
        f.seek(4096)
        f.write(b"overwrite")
        f.flush()
        os.fsync(f.fileno())
    assert ei.value.errno in (errno.EPERM, errno.EROFS, errno.EACCES), ei.value
    with open(ro, "rb") as f:
        f.seek(4096)
        assert f.read(9) == b"raw bytes"
    assert code_of(driver.unstage, vid, staging) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(driver.delete, vid) == grpc.StatusCode.FAILED_PRECONDITION
    driver.unpublish(vid, ro)
    driver.unpublish(vid, target)
    assert not os.path.exists(target) and not os.path.exists(ro)
    assert observe.loops_over(dm) == [], "the read-only view outlived its publish"
    driver.unstage(vid, staging)
    row = lv(vg.name, lv_name(vid))
    assert row is not None and row["lv_attr"][4] == "-", "unstage deactivates the LV"
    assert observe.mounts_under(staging) == [] and os.listdir(staging) == []
    # The bytes outlive a restage.
    driver.stage(vid, staging, block_cap())
    driver.publish(vid, staging, target, block_cap())
    with open(target, "rb") as f:
        f.seek(4096)
        assert f.read(9) == b"raw bytes"
    driver.unpublish(vid, target)
    driver.unstage(vid, staging)
    driver.delete(vid)


def test_teardown_touches_only_the_volumes_own_mounts(driver: LvmDriver, vg: GuestVg) -> None:
    """Ownership is decided by device numbers, and device-mapper's (254:N)
    work as the loop devices' do: another volume's mounts and a mount ELV did
    not make survive every teardown call about them."""
    a = driver.create("own-a", 64 * MiB, mount_cap(), parameters={CLASS: "thin"})
    b = driver.create("own-b", 64 * MiB, mount_cap(), parameters={CLASS: "thick"})
    sa, sb, tb = driver.path("st", "a"), driver.path("st", "b"), driver.path("pub", "b")
    foreign = driver.path("pub", "foreign")
    os.makedirs(foreign)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "foreign", foreign], check=True)
    try:
        driver.stage(b, sb)
        driver.publish(b, sb, tb)
        driver.stage(a, sa)
        before = [(m.mount_point, m.major, m.minor) for m in observe.mounts_under(driver.kubelet)]
        for path in (tb, sb, foreign):
            assert code_of(driver.unpublish, a, path) == grpc.StatusCode.OK
            assert code_of(driver.unstage, a, path) == grpc.StatusCode.OK
        assert [(m.mount_point, m.major, m.minor) for m in observe.mounts_under(driver.kubelet)] == before
        top = observe.top(foreign)
        assert top is not None and top.source == "foreign"
        assert driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id=b, volume_path=tb)).usage, (
            "B's publish is intact"
        )
        # A second staging path is refused; A stays staged where it was.
        assert code_of(driver.stage, a, driver.path("st", "a2")) == grpc.StatusCode.FAILED_PRECONDITION
        row = lv(vg.name, lv_name(a))
        assert row is not None and row["lv_attr"][4] == "a"
    finally:
        subprocess.run(["umount", foreign], check=False)
    driver.unstage(a, sa)
    driver.unpublish(b, tb)
    driver.unstage(b, sb)
    driver.delete(a)
    driver.delete(b)


def test_bad_class_and_params(driver: LvmDriver) -> None:
    def create(params: dict[str, str]) -> None:
        driver.create("bad", 32 * MiB, parameters=params)

    assert code_of(create, {CLASS: "nosuch"}) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(create, {"elv.csi.dev/lvm-type": "raid5"}) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(create, {CLASS: "thin", "elv.csi.dev/lvm-type": "raid1"}) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(create, {CLASS: "thick"}) == grpc.StatusCode.OK
    vid = driver.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="bad",
            volume_capabilities=[mount_cap()],
            parameters={CLASS: "thick"},
            capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB),
        )
    ).volume.volume_id
    driver.delete(vid)


@pytest.mark.parametrize("cls", ["thick", "thin"])
def test_names_and_ids(driver: LvmDriver, vg: GuestVg, cls: str) -> None:
    """An ID names one volume for ever; the name finds the volume while it
    exists; a repeat must fit the request's limit."""
    name = "again-" + cls

    def create(required: int, limit: int = 0) -> str:
        req = csi_pb2.CreateVolumeRequest(
            name=name,
            volume_capabilities=[mount_cap()],
            parameters={CLASS: cls},
            capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
        )
        return driver.controller.CreateVolume(req).volume.volume_id

    def snapshots_of(vid: str) -> list[str]:
        resp = driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=vid))
        return [e.snapshot.snapshot_id for e in resp.entries]

    old = create(64 * MiB)
    snap = driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name=name + "-snap", source_volume_id=old))
    sid = snap.snapshot.snapshot_id
    assert code_of(create, 32 * MiB, 48 * MiB) == grpc.StatusCode.ALREADY_EXISTS, "64 MiB exceeds limit_bytes"
    assert create(32 * MiB, 64 * MiB) == old
    driver.delete(old)
    new = create(64 * MiB)
    assert new != old, "an ID must name one volume for ever"
    assert snapshots_of(new) == [] and snapshots_of(old) == [sid]
    get = csi_pb2.ControllerGetVolumeRequest(volume_id=old)
    assert code_of(driver.controller.ControllerGetVolume, get) == grpc.StatusCode.NOT_FOUND
    driver.delete(old)  # a CO still holding the old ID deletes nothing of the new volume
    row = lv(vg.name, lv_name(new))
    assert row is not None and "elv.wipe" not in row["lv_tags"]
    driver.restart()
    assert create(64 * MiB) == new, "the name finds it across a restart (LVM's tags are the only state)"
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
    driver.delete(new)
