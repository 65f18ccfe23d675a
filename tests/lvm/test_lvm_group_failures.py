"""A refused or killed LVM group snapshot leaves nothing: no group, no member
LV (beyond what the wiper is removing), no frozen filesystem; and the same
request works once there is room. Thin: the class's promise runs out at the
second member. Thick: the VG's extents run out at the second member's
copy-on-write store. A kill lands while the second member's lvcreate hangs
(an ``lvm`` wrapper on --tool-path)."""

from __future__ import annotations

import os
import threading
import time

import grpc

from csi.model import DEVICE_CLASS as CLASS
from csi.v1 import csi_pb2
from tests.support.driver import stop_cleanly
from tests.support.lvm import GuestVg, LvmDriver, MiB, class_config, lvm, lvs, ours, wait_for, write_config
from tests.support.rpc import code_of
from tests.support.wrappers import Wrapper, frozen, thaw

EXTENT = 4 * MiB


def capacity(d: LvmDriver, cls: str) -> int:
    time.sleep(1.1)  # past the read-only report cache
    return int(d.controller.GetCapacity(csi_pb2.GetCapacityRequest(parameters={CLASS: cls})).available_capacity)


def snapshot_lvs(vg: GuestVg, *, wiping: bool = False) -> list[str]:
    """ELV's snapshot LVs in the VG (those being wiped only if asked)."""
    rows = [r for r in lvs(vg.name) if "elv.kind=s" in r["lv_tags"].split(",")]
    return sorted(r["lv_name"] for r in rows if wiping or "elv.wipe" not in r["lv_tags"].split(","))


def assert_no_group(d: LvmDriver, vg: GuestVg, name: str, mounts: list[str]) -> None:
    assert list(d.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries) == []
    assert snapshot_lvs(vg) == [], "a member of the failed group is still in service"
    wait_for(lambda: not snapshot_lvs(vg, wiping=True), 120, "the wiper to remove the failed group's members")
    assert [mp for mp in mounts if frozen(mp)] == [], "a failed group snapshot left a filesystem frozen"


def staged(d: LvmDriver, cls: str, size: int, count: int = 2) -> tuple[list[str], list[str]]:
    vids = [d.create(f"gm-{cls}-{i}", size, parameters={CLASS: cls}) for i in range(count)]
    mounts = [d.path("st", f"gm-{cls}-{i}") for i in range(count)]
    for vid, mp in zip(vids, mounts, strict=True):
        d.stage(vid, mp)
        with open(os.path.join(mp, "data"), "wb") as f:
            f.write(b"member data" * 1000)
            os.fsync(f.fileno())
    return vids, mounts


def release(d: LvmDriver, vids: list[str], mounts: list[str]) -> None:
    for vid, mp in zip(vids, mounts, strict=True):
        thaw(mp)
        d.unstage(vid, mp)
        d.delete(vid)


def create_and_delete(d: LvmDriver, name: str, vids: list[str]) -> None:
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=vids)
    g = d.group.CreateVolumeGroupSnapshot(req).group_snapshot
    assert g.ready_to_use and sorted(s.source_volume_id for s in g.snapshots) == sorted(vids)
    d.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id))


def test_thin_promise_runs_out_at_the_second_member(driver: LvmDriver, vg: GuestVg) -> None:
    member = 128 * MiB
    avail = capacity(driver, "thin")
    # With the filler, the members and one member snapshot fit, a second does not.
    filler_size = (avail - 7 * member // 2) // EXTENT * EXTENT
    filler = driver.create("gm-filler", filler_size, parameters={CLASS: "thin"})
    vids, mounts = staged(driver, "thin", member)
    try:
        req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="thin-room", source_volume_ids=vids)
        assert code_of(driver.group.CreateVolumeGroupSnapshot, req) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "created snapshot" in driver.log(), "the first member was made before the second was refused"
        assert_no_group(driver, vg, "thin-room", mounts)
        driver.delete(filler)
        filler = ""
        create_and_delete(driver, "thin-room", vids)
        assert_no_group(driver, vg, "thin-room", mounts)
    finally:
        if filler:
            driver.delete(filler)
        release(driver, vids, mounts)


def test_thick_extents_run_out_at_the_second_member(driver: LvmDriver, vg: GuestVg) -> None:
    member = 64 * MiB
    vids, mounts = staged(driver, "thick", member)
    # A foreign LV leaves room for one member's copy-on-write store (72 MiB), not two.
    free = int(lvm("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", vg.name).stdout.strip())
    lvm("lvcreate", "-q", "-y", "-n", "gm-foreign", "-L", f"{(free - 108 * MiB) // EXTENT * EXTENT}b", vg.name)
    foreign = True
    try:
        req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="thick-room", source_volume_ids=vids)
        assert code_of(driver.group.CreateVolumeGroupSnapshot, req) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "created snapshot" in driver.log(), "the first member was made before the second was refused"
        assert_no_group(driver, vg, "thick-room", mounts)
        lvm("lvremove", "-y", f"{vg.name}/gm-foreign")
        foreign = False
        create_and_delete(driver, "thick-room", vids)
        assert_no_group(driver, vg, "thick-room", mounts)
    finally:
        if foreign:
            lvm("lvremove", "-y", f"{vg.name}/gm-foreign", check=False)
        release(driver, vids, mounts)


def test_a_kill_at_the_second_member_is_undone_at_start(base: str, vg: GuestVg) -> None:
    hang = Wrapper(os.path.join(base, "tools"), "lvm", match='lvcreate*" -s "*', hang_at=2).install()
    # The wrapper sees only lvm processes: the changes' resident shell would
    # take each lvcreate past it. How the member's lvcreate runs is not what
    # this tests (the crash and power-loss tests kill inside the shell's).
    cfg = write_config(os.path.join(base, "lvm.toml"), "change-shell = false\n" + class_config(vg))
    d = LvmDriver(base, ["--lvm-config", cfg], "--tool-path", hang.tool_path).start()
    vids, mounts = staged(d, "thin", 64 * MiB)
    codes: list[grpc.StatusCode] = []
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="killed", source_volume_ids=vids)
    t = threading.Thread(target=lambda: codes.append(code_of(d.group.CreateVolumeGroupSnapshot, req)))
    try:
        t.start()
        hang.wait_reached(300)
        assert len(snapshot_lvs(vg)) == 1, "the kill lands after the first member was made"
        d.kill()
        hang.release()
        t.join(timeout=60)
        assert codes and codes[0] != grpc.StatusCode.OK
        d.start()
        assert_no_group(d, vg, "killed", mounts)
        create_and_delete(d, "killed", vids)
        assert_no_group(d, vg, "killed", mounts)
        release(d, vids, mounts)
        wait_for(lambda: not ours(vg), 120, "the wiper to finish")
    finally:
        hang.release()
        t.join(timeout=60)
        for mp in mounts:
            thaw(mp)
        stop_cleanly(d, base)
