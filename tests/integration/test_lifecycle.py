"""A volume's life on real loop devices and mounts, and the data-safety rules."""

from __future__ import annotations

import errno
import os
import stat
import subprocess

import grpc
import pytest

from csi.v1 import csi_pb2
from tests.support import observe
from tests.support.driver import Driver, MiB, leftovers
from tests.support.rpc import SNRO, SNSW, block_cap, code_of, mount_cap


def image(d: Driver, vid: str) -> str:
    return os.path.join(d.pool, "volumes", vid + ".img")


def loops_of(d: Driver, vid: str) -> list[str]:
    return [x.path for x in observe.loops() if x.backing_file == os.path.realpath(image(d, vid))]


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_whole_life_mount(driver: Driver, fs: str) -> None:
    size = 320 * MiB if fs == "xfs" else 64 * MiB
    cap = mount_cap(fs)
    vid = driver.create(f"life-{fs}", size, cap)
    assert os.stat(image(driver, vid)).st_size == size
    assert os.stat(image(driver, vid)).st_blocks == 0, "a new volume must be sparse"
    staging, target = driver.path("st", vid), driver.path("pods", "p1", "vol")
    os.makedirs(os.path.dirname(target))
    driver.stage(vid, staging, cap)
    driver.stage(vid, staging, cap)  # idempotent
    assert len(loops_of(driver, vid)) == 1, "never two loop devices for one volume"
    assert [x.direct_io for x in observe.loops() if x.backing_file == os.path.realpath(image(driver, vid))] == [True]
    driver.publish(vid, staging, target, cap)
    driver.publish(vid, staging, target, cap)  # idempotent
    top = observe.top(target)
    assert top is not None and top.fstype == fs
    with open(os.path.join(target, "data"), "w") as f:
        f.write("payload")
    # The durable "formatted" record (a marker next to the metadata).
    assert os.path.exists(os.path.join(driver.pool, "volumes", f"{vid}.formatted.{fs}"))

    driver.unpublish(vid, target)
    assert not os.path.exists(target), "NodeUnpublish must remove the target it created"
    driver.unpublish(vid, target)  # idempotent, target gone
    driver.unstage(vid, staging)
    driver.unstage(vid, staging)  # idempotent
    assert loops_of(driver, vid) == []
    driver.delete(vid)
    driver.delete(vid)  # idempotent
    assert not os.path.exists(image(driver, vid))
    assert leftovers(driver.base) == []


def test_remount_never_reformats(driver: Driver) -> None:
    vid = driver.create("keep")
    staging = driver.path("st", "keep")
    for round_ in range(3):
        driver.stage(vid, staging)
        path = os.path.join(staging, f"round-{round_}")
        with open(path, "w") as f:
            f.write(str(round_))
        for r in range(round_ + 1):
            assert os.path.exists(os.path.join(staging, f"round-{r}")), "data lost across restage"
        driver.unstage(vid, staging)
    driver.delete(vid)


def test_other_filesystem_on_device_is_refused_and_kept(driver: Driver) -> None:
    vid = driver.create("foreign", 320 * MiB)
    # Someone put xfs on it behind our back before its first stage.
    subprocess.run(["mkfs.xfs", "-q", image(driver, vid)], check=True)
    before = subprocess.run(["blkid", "-p", "-o", "export", image(driver, vid)], capture_output=True, text=True).stdout
    staging = driver.path("st", "foreign")
    assert code_of(driver.stage, vid, staging, mount_cap("ext4")) == grpc.StatusCode.FAILED_PRECONDITION
    after = subprocess.run(["blkid", "-p", "-o", "export", image(driver, vid)], capture_output=True, text=True).stdout
    assert "TYPE=xfs" in after and before == after, "the foreign filesystem must be untouched"
    assert loops_of(driver, vid) == [], "a failed stage leaves no loop device"
    driver.delete(vid)


def test_stage_with_other_fs_than_recorded_is_refused(driver: Driver) -> None:
    vid = driver.create("ext", 320 * MiB, mount_cap("ext4"))
    staging = driver.path("st", "ext")
    driver.stage(vid, staging, mount_cap("ext4"))
    with open(os.path.join(staging, "f"), "w") as f:
        f.write("x")
    driver.unstage(vid, staging)
    assert code_of(driver.stage, vid, staging, mount_cap("xfs")) == grpc.StatusCode.FAILED_PRECONDITION
    driver.stage(vid, staging, mount_cap("ext4"))
    assert os.path.exists(os.path.join(staging, "f"))
    driver.unstage(vid, staging)
    driver.delete(vid)


def test_delete_in_use_is_refused(driver: Driver) -> None:
    vid = driver.create("busy")
    staging = driver.path("st", "busy")
    driver.stage(vid, staging)
    assert code_of(driver.delete, vid) == grpc.StatusCode.FAILED_PRECONDITION
    assert os.path.exists(image(driver, vid))
    assert code_of(driver.unstage, vid, staging) == grpc.StatusCode.OK
    driver.delete(vid)


def test_unstage_while_published_is_refused(driver: Driver) -> None:
    vid = driver.create("pub")
    staging, target = driver.path("st", "pub"), driver.path("t", "pub")
    os.makedirs(os.path.dirname(target))
    driver.stage(vid, staging)
    driver.publish(vid, staging, target)
    assert code_of(driver.unstage, vid, staging) == grpc.StatusCode.FAILED_PRECONDITION
    assert observe.top(target) is not None
    driver.unpublish(vid, target)
    driver.unstage(vid, staging)
    driver.delete(vid)


def test_readonly_publish(driver: Driver) -> None:
    vid = driver.create("ro")
    staging, target = driver.path("st", "ro"), driver.path("t", "ro")
    os.makedirs(os.path.dirname(target))
    driver.stage(vid, staging)
    driver.publish(vid, staging, target, readonly=True)
    with pytest.raises(OSError) as e:
        open(os.path.join(target, "x"), "w").close()
    assert e.value.errno == errno.EROFS
    # The same target with readonly=false is an incompatible repeat.
    assert code_of(driver.publish, vid, staging, target, readonly=False) == grpc.StatusCode.ALREADY_EXISTS
    other = driver.path("t", "ro2")
    driver.publish(vid, staging, other, mount_cap(mode=SNRO))
    top = observe.top(other)
    assert top is not None and top.readonly
    driver.unpublish(vid, target)
    driver.unpublish(vid, other)
    driver.unstage(vid, staging)
    driver.delete(vid)


def test_single_writer_refuses_second_target(driver: Driver) -> None:
    cap = mount_cap(mode=SNSW)
    vid = driver.create("rwop", cap=cap)
    staging, t1, t2 = driver.path("st", "rwop"), driver.path("t", "a"), driver.path("t", "b")
    os.makedirs(os.path.dirname(t1))
    driver.stage(vid, staging, cap)
    driver.publish(vid, staging, t1, cap)
    assert code_of(driver.publish, vid, staging, t2, cap) == grpc.StatusCode.FAILED_PRECONDITION
    assert not os.path.exists(t2)
    driver.unpublish(vid, t1)
    driver.unstage(vid, staging)
    driver.delete(vid)


def test_publish_before_stage_fails(driver: Driver) -> None:
    vid = driver.create("nostage")
    staging, target = driver.path("st", "nostage"), driver.path("t", "nostage")
    os.makedirs(staging)
    assert code_of(driver.publish, vid, staging, target) == grpc.StatusCode.FAILED_PRECONDITION
    assert not os.path.exists(target)
    driver.delete(vid)


def test_block_volume(driver: Driver) -> None:
    cap = block_cap()
    vid = driver.create("blk", 32 * MiB, cap)
    staging, target = driver.path("st", "blk"), driver.path("t", "blk", "dev")
    os.makedirs(os.path.dirname(target))
    driver.stage(vid, staging, cap)
    driver.publish(vid, staging, target, cap)
    driver.publish(vid, staging, target, cap)  # idempotent
    st = os.stat(target)
    assert stat.S_ISBLK(st.st_mode)
    fd = os.open(target, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == 32 * MiB
        os.pwrite(fd, b"ELVBLOCK", 4096)
    finally:
        os.close(fd)
    assert code_of(driver.unstage, vid, staging) == grpc.StatusCode.FAILED_PRECONDITION
    driver.unpublish(vid, target)
    assert not os.path.exists(target)
    driver.unstage(vid, staging)
    with open(image(driver, vid), "rb") as f:
        f.seek(4096)
        assert f.read(8) == b"ELVBLOCK", "block writes reach the backing file"
    # A mount stage of a block volume is refused.
    assert code_of(driver.stage, vid, staging, mount_cap()) == grpc.StatusCode.FAILED_PRECONDITION
    driver.delete(vid)


def test_stats_and_condition(driver: Driver) -> None:
    vid = driver.create("stats")
    staging, target = driver.path("st", "stats"), driver.path("t", "stats")
    os.makedirs(os.path.dirname(target))
    driver.stage(vid, staging)
    driver.publish(vid, staging, target)
    resp = driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target))
    units = {u.unit: u for u in resp.usage}
    b = units[csi_pb2.VolumeUsage.BYTES]
    assert 50 * MiB < b.total <= 64 * MiB and b.used + b.available <= b.total
    assert units[csi_pb2.VolumeUsage.INODES].total > 0
    assert not resp.volume_condition.abnormal
    # Not mounted there: NOT_FOUND.
    other = driver.path("t", "elsewhere")
    os.makedirs(other)
    assert code_of(
        driver.node.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=other)
    ) == (grpc.StatusCode.NOT_FOUND)
    driver.unpublish(vid, target)
    driver.unstage(vid, staging)
    driver.delete(vid)


def test_capacity_is_honest(driver: Driver) -> None:
    cap0 = driver.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
    st = os.statvfs(driver.pool)
    assert 0 < cap0 <= st.f_bavail * st.f_frsize
    vid = driver.create("cap", 256 * MiB)
    cap1 = driver.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
    # The sparse volume's full size is promised away, though nothing is allocated yet.
    assert cap0 - cap1 >= 255 * MiB
    too_big = csi_pb2.CreateVolumeRequest(
        name="too-big",
        volume_capabilities=[mount_cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=cap1 + 1024 * MiB),
    )
    assert code_of(driver.controller.CreateVolume, too_big) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sorted(os.listdir(os.path.join(driver.pool, "volumes"))) == sorted([vid + ".img", vid + ".json"])
    assert os.listdir(os.path.join(driver.pool, "tmp")) == []
    driver.delete(vid)


def test_thick_volume_is_allocated(driver: Driver) -> None:
    vid = driver.create("thick", 32 * MiB, parameters={"elv.csi.dev/provisioning": "thick"})
    assert os.stat(image(driver, vid)).st_blocks * 512 >= 32 * MiB
    staging = driver.path("st", "thick")
    driver.stage(vid, staging)
    driver.unstage(vid, staging)
    # mkfs ran with nodiscard: the reservation is still there.
    assert os.stat(image(driver, vid)).st_blocks * 512 >= 32 * MiB
    driver.delete(vid)


def test_block_size_parameter(driver: Driver) -> None:
    def logical(vid: str) -> int:
        name = loops_of(driver, vid)[0].rsplit("/", 1)[1]
        with open(f"/sys/block/{name}/queue/logical_block_size") as f:
            return int(f.read())

    sizes = {}
    for name, params in (("bs-default", {}), ("bs-512", {"elv.csi.dev/block-size": "512"})):
        vid = driver.create(name, 320 * MiB, mount_cap("xfs"), parameters=params)
        staging = driver.path("st", name)
        driver.stage(vid, staging, mount_cap("xfs"))
        sizes[name] = logical(vid)
        with open(os.path.join(staging, "f"), "w") as f:
            f.write(name)
        driver.unstage(vid, staging)
        # A clone keeps its source's block size (xfs would not mount otherwise) ...
        src = csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vid))
        clone = driver.create(name + "-clone", 320 * MiB, mount_cap("xfs"), volume_content_source=src)
        cst = driver.path("st", name + "-clone")
        driver.stage(clone, cst, mount_cap("xfs"))
        assert logical(clone) == sizes[name]
        with open(os.path.join(cst, "f")) as f:
            assert f.read() == name
        driver.unstage(clone, cst)
        driver.delete(clone)
        # ... and asking for another one is refused.
        other = "512" if sizes[name] == 4096 else "4096"
        req = csi_pb2.CreateVolumeRequest(
            name=name + "-x",
            volume_capabilities=[mount_cap("xfs")],
            volume_content_source=src,
            parameters={"elv.csi.dev/block-size": other},
            capacity_range=csi_pb2.CapacityRange(required_bytes=320 * MiB),
        )
        assert code_of(driver.controller.CreateVolume, req) == grpc.StatusCode.FAILED_PRECONDITION
        driver.delete(vid)
    assert sizes == {"bs-default": 4096, "bs-512": 512}
