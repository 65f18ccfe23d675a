"""A group snapshot or a clone that fails, at any point, leaves nothing: no
group record, no member snapshot, no half-copied image, no frozen
filesystem; and the same request works once the cause is gone. Failures are
landed exactly with tool wrappers (tests/support/wrappers.py): the Nth copy
fails with ENOSPC, or hangs while the test kills the driver."""

from __future__ import annotations

import os
import threading

import grpc
import pytest

from csi.model import ids
from csi.v1 import csi_pb2
from tests.support.driver import Driver, MiB, leftovers
from tests.support.rpc import code_of
from tests.support.wrappers import Wrapper, frozen, small_pool, thaw, unmount_pool

ENOSPC = "cp: error writing 'x': No space left on device"


def write_data(mount_point: str, mib: int) -> None:
    with open(os.path.join(mount_point, "data"), "wb") as f:
        f.write(os.urandom(mib * MiB))
        f.flush()
        os.fsync(f.fileno())


def group_req(name: str, vids: list[str]) -> csi_pb2.CreateVolumeGroupSnapshotRequest:
    return csi_pb2.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=vids)


def assert_no_group(d: Driver, name: str, mounts: list[str]) -> None:
    """What a failed group create must leave: nothing, seen through CSI and on disk."""
    assert list(d.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries) == []
    assert os.listdir(os.path.join(d.pool, "groups")) == []
    assert os.listdir(os.path.join(d.pool, "snapshots")) == []
    assert [n for n in os.listdir(os.path.join(d.pool, "tmp")) if "frozen" in n] == []
    assert [mp for mp in mounts if frozen(mp)] == [], "a failed group snapshot left a filesystem frozen"


def create_group_and_delete(d: Driver, name: str, vids: list[str]) -> None:
    g = d.group.CreateVolumeGroupSnapshot(group_req(name, vids)).group_snapshot
    assert g.ready_to_use and sorted(s.source_volume_id for s in g.snapshots) == sorted(vids)
    d.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id))


def stage_two(d: Driver, mib: int = 2) -> tuple[list[str], list[str]]:
    vids = [d.create(f"member-{i}", 32 * MiB) for i in range(2)]
    mounts = [d.path("st", f"member-{i}") for i in range(2)]
    for vid, mp in zip(vids, mounts, strict=True):
        d.stage(vid, mp)
        write_data(mp, mib)
    return vids, mounts


def cleanup(d: Driver, vids: list[str], mounts: list[str]) -> None:
    for vid, mp in zip(vids, mounts, strict=True):
        thaw(mp)
        d.unstage(vid, mp)
        d.delete(vid)


@pytest.fixture
def tools(base: str) -> str:
    return os.path.join(base, "tools")


@pytest.mark.parametrize("bad", ["missing", "other-pool", "other-backend"])
def test_a_refused_member_leaves_nothing(driver: Driver, bad: str) -> None:
    vids, mounts = stage_two(driver)
    try:
        other = {
            "missing": str(ids.new("v", "loop", "never-made")),
            "other-pool": str(ids.new("v", "thick", "member-1")),
            "other-backend": str(ids.new("v", "thin", "member-1")),
        }[bad]
        req = group_req("refused", [vids[0], other])
        assert code_of(driver.group.CreateVolumeGroupSnapshot, req) == grpc.StatusCode.NOT_FOUND
        assert_no_group(driver, "refused", mounts)
        # The name is free: the same name over other volumes is a new group.
        create_group_and_delete(driver, "refused", vids)
        assert_no_group(driver, "refused", mounts)
    finally:
        cleanup(driver, vids, mounts)


def test_no_space_refuses_the_group_and_leaves_nothing(base: str) -> None:
    small_pool(base, 128)
    d = Driver(base).start()
    try:
        vids, mounts = stage_two(d, mib=6)
        # A thick volume takes the room the two member copies (over 12 MiB) need.
        avail = d.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
        assert avail > 20 * MiB
        filler = d.create("filler", avail - 4 * MiB, parameters={"elv.csi.dev/provisioning": "thick"})
        req = group_req("no-room", vids)
        assert code_of(d.group.CreateVolumeGroupSnapshot, req) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_no_group(d, "no-room", mounts)
        # Refused again, the same way: the failed call left no record to answer OK with.
        assert code_of(d.group.CreateVolumeGroupSnapshot, req) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_no_group(d, "no-room", mounts)
        # Once space is freed, the same request works.
        d.delete(filler)
        create_group_and_delete(d, "no-room", vids)
        assert_no_group(d, "no-room", mounts)
        cleanup(d, vids, mounts)
    finally:
        assert d.stop() == 0
        unmount_pool(base)
    assert leftovers(base) == []


def test_no_space_mid_way_leaves_nothing(base: str, tools: str) -> None:
    cp = Wrapper(tools, "cp", fail_at=2, message=ENOSPC).install()
    d = Driver(base, "--tool-path", cp.tool_path).start()
    vids, mounts = stage_two(d)
    try:
        req = group_req("mid-way", vids)
        assert code_of(d.group.CreateVolumeGroupSnapshot, req) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert cp.calls() == 2, "the first member was copied, the second failed"
        assert_no_group(d, "mid-way", mounts)
        create_group_and_delete(d, "mid-way", vids)
        assert_no_group(d, "mid-way", mounts)
    finally:
        cleanup(d, vids, mounts)
        assert d.stop() == 0
    assert leftovers(base) == []


def test_a_kill_mid_way_is_undone_at_start(base: str, tools: str) -> None:
    cp = Wrapper(tools, "cp", hang_at=2).install()
    d = Driver(base, "--tool-path", cp.tool_path).start()
    vids, mounts = stage_two(d)
    threads: list[threading.Thread] = []
    try:
        codes: list[grpc.StatusCode] = []
        t = threading.Thread(
            target=lambda: codes.append(code_of(d.group.CreateVolumeGroupSnapshot, group_req("k", vids)))
        )
        t.start()
        threads.append(t)
        cp.wait_reached()
        assert [frozen(mp) for mp in mounts] == [True, True], "the kill lands while the group is frozen"
        d.kill()
        cp.release()
        t.join(timeout=60)
        assert codes and codes[0] != grpc.StatusCode.OK
        d.start()
        assert "recovery: thawed" in d.log()
        assert_no_group(d, "k", mounts)
        create_group_and_delete(d, "k", vids)
        assert_no_group(d, "k", mounts)
    finally:
        cp.release()
        for t in threads:
            t.join(timeout=60)
        cleanup(d, vids, mounts)
        assert d.stop() == 0
    assert leftovers(base) == []


def test_a_kill_mid_clone_thaws_the_source_and_leaves_no_clone(base: str, tools: str) -> None:
    cp = Wrapper(tools, "cp", hang_at=1).install()
    d = Driver(base, "--tool-path", cp.tool_path).start()
    src = d.create("source", 32 * MiB)
    mp = d.path("st", "source")
    d.stage(src, mp)
    write_data(mp, 2)
    threads: list[threading.Thread] = []
    try:
        source = csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=src))
        codes: list[grpc.StatusCode] = []
        t = threading.Thread(
            target=lambda: codes.append(code_of(d.create, "clone", 32 * MiB, volume_content_source=source))
        )
        t.start()
        threads.append(t)
        cp.wait_reached()
        assert frozen(mp), "a clone of a staged volume copies it frozen, like a snapshot"
        d.kill()
        cp.release()
        t.join(timeout=60)
        assert codes and codes[0] != grpc.StatusCode.OK
        d.start()
        assert not frozen(mp)
        listed = [e.volume.volume_id for e in d.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries]
        assert listed == [src]
        left = os.listdir(os.path.join(d.pool, "volumes"))
        assert [n for n in left if not n.startswith(src + ".")] == [], "the half-made clone is gone"
        clone = d.create("clone", 32 * MiB, volume_content_source=source)
        d.delete(clone)
    finally:
        cp.release()
        thaw(mp)
        for t in threads:
            t.join(timeout=60)
        d.unstage(src, mp)
        d.delete(src)
        assert d.stop() == 0
    assert leftovers(base) == []
