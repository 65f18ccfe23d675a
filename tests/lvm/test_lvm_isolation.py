"""Tenant isolation that can fail (issue 15, item 13).

The stream VGs' PVs are sparse, so extents nobody wrote read as zeros and a
missing wipe would go unseen. Here the PVs are filled with a pattern first
(``OLD_PV``, standing for whatever the disk held before), so an unwiped
extent shows it. Each test proves the new volume got the very extents of
the deleted one (``lvs -o seg_pe_ranges``) and that it reads none of the old
bytes: a thick volume, a copy-on-write snapshot's store (which holds the
origin's old blocks), and a wipe cut off half-way by a kill of the driver and
of the wipe itself. A control shows that an LV made on unwiped extents does
read the pattern: the tests can fail.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator

import pytest

from csi.model import DEVICE_CLASS as CLASS
from csi.v1 import csi_pb2
from tests.support.driver import leftovers
from tests.support.lvm import (
    GuestVg,
    LvmDriver,
    MiB,
    class_config,
    destroy_vg,
    lvm,
    lvs,
    make_vg,
    ours,
    wait_for,
    write_config,
)
from tests.support.rpc import block_cap

OLD_PV = b"OLD-PV-BYTES-NOT-YOURS!"
TENANT = b"PREVIOUS-TENANT-DATA:"
PV_SIZE = 96 * MiB


@pytest.fixture(scope="module")
def pvg(dm_ready: None, vg: GuestVg) -> Iterator[GuestVg]:
    """A VG of two pattern-filled loop files (RAM in the guest, so small), with
    a zeroing thin pool; named after the stream's VG so streams never clash.
    Each test leaves it as it found it: every extent outside the pool free."""
    name = vg.name + "iso"
    work = f"/tmp/elv-lvm-pvs-{name}"
    os.makedirs(work, exist_ok=True)
    v = make_vg(name, work, (PV_SIZE, PV_SIZE), pool_size="16m", pattern=OLD_PV)
    try:
        # The control: an LV on extents nobody wiped shows the pattern.
        lvm("lvcreate", "-q", "-y", "-n", "control", "-L", "4m", "-W", "n", "-Z", "n", v.name)
        assert OLD_PV in read_lv(v, "control"), "the pattern must be there for the tests to mean anything"
        lvm("lvremove", "-q", "-y", f"{v.name}/control")
        yield v
    finally:
        problems = destroy_vg(v)
        shutil.rmtree(work, ignore_errors=True)
        assert not problems, problems


def start(base: str, v: GuestVg, *extra: str) -> LvmDriver:
    cfg = write_config(os.path.join(base, "iso.toml"), class_config(v))
    d = LvmDriver(base, ["--lvm-config", cfg, *extra])
    d.start()
    return d


def finish(d: LvmDriver, v: GuestVg, base: str) -> None:
    wait_for(lambda: not ours(v), 120, "the wiper to finish")
    rc = d.stop()
    assert rc == 0, d.log()[-3000:]
    assert "Traceback" not in d.log(), d.log()[-5000:]
    assert leftovers(base) == []


def lv_of(v: GuestVg, before: set[str]) -> str:
    (name,) = set(ours(v)) - before
    return name


def extents(v: GuestVg, lv: str) -> str:
    """Which physical extents hold the LV, e.g. "/dev/loop3:0-7"."""
    out = lvm("lvs", "--noheadings", "-o", "seg_pe_ranges", f"{v.name}/{lv}").stdout
    return " ".join(out.split())


def device_of(v: GuestVg, lv: str) -> str:
    """/dev/dm-N of an active LV (from sysfs: the guest has no udev links)."""
    row = next(r for r in lvs(v.name) if r["lv_name"] == lv)
    name = os.path.basename(os.readlink(f"/sys/dev/block/{row['lv_kernel_major']}:{row['lv_kernel_minor']}"))
    return "/dev/" + name


def extent_size(v: GuestVg) -> int:
    out = lvm("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_extent_size", v.name).stdout
    return int(out.strip())


def read_lv(v: GuestVg, lv: str) -> bytes:
    lvm("lvchange", "-q", "-ay", "-K", f"{v.name}/{lv}")
    with open(device_of(v, lv), "rb") as f:
        return f.read()


def fill(d: LvmDriver, vid: str, pattern: bytes, size: int) -> None:
    st, pub = d.path("st", vid), d.path("pub", vid)
    d.stage(vid, st, block_cap())
    d.publish(vid, st, pub, block_cap())
    with open(pub, "r+b") as f:
        f.write((pattern * (size // len(pattern) + 1))[:size])
        os.fsync(f.fileno())
    d.unpublish(vid, pub)
    d.unstage(vid, st)


def read_volume(d: LvmDriver, vid: str) -> bytes:
    st, pub = d.path("st", vid), d.path("pub", vid)
    d.stage(vid, st, block_cap())
    d.publish(vid, st, pub, block_cap())
    with open(pub, "rb") as f:
        data = f.read()
    d.unpublish(vid, pub)
    d.unstage(vid, st)
    return data


def assert_clean(data: bytes, *old: bytes) -> None:
    for pattern in (OLD_PV, *old):
        at = data.find(pattern)
        assert at < 0, f"the new volume reads old bytes {pattern!r} at offset {at}"


def test_a_new_volume_on_a_deleted_ones_extents_reads_none_of_its_bytes(base: str, pvg: GuestVg) -> None:
    d = start(base, pvg)
    try:
        a = d.create("tenant-a", 32 * MiB, block_cap(), parameters={CLASS: "thick"})
        lv_a = lv_of(pvg, set())
        fill(d, a, TENANT, 32 * MiB)
        where = extents(pvg, lv_a)
        d.delete(a)
        wait_for(lambda: not ours(pvg), 120, "the wipe")
        b = d.create("tenant-b", 32 * MiB, block_cap(), parameters={CLASS: "thick"})
        assert extents(pvg, lv_of(pvg, set())) == where, "the new volume must get the deleted one's extents"
        data = read_volume(d, b)
        assert len(data) == 32 * MiB
        assert_clean(data, TENANT)
        # A thin volume in the pool on these PVs: a partial write maps a whole
        # chunk, and the pool zeroes the rest of it.
        t = d.create("thin-tenant", 16 * MiB, block_cap(), parameters={CLASS: "thin"})
        fill(d, t, b"T", 4096)
        thin = read_volume(d, t)
        assert thin[:4096] == b"T" * 4096
        assert_clean(thin)
        assert thin[4096:] == bytes(len(thin) - 4096)
        for vid in (b, t):
            d.delete(vid)
    finally:
        finish(d, pvg, base)


def test_a_deleted_snapshots_store_is_wiped_before_reuse(base: str, pvg: GuestVg) -> None:
    d = start(base, pvg)
    try:
        origin = d.create("origin", 16 * MiB, block_cap(), parameters={CLASS: "thick"})
        fill(d, origin, TENANT, 16 * MiB)
        before = set(ours(pvg))
        sid = d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=origin))
        snap_lv = lv_of(pvg, before)
        # Overwrite the origin: its old blocks move into the snapshot's store.
        fill(d, origin, b"NEW-ORIGIN-DATA!", 16 * MiB)
        where = extents(pvg, snap_lv)
        store = sum(int(r.split("-")[1]) - int(r.split("-")[0]) + 1 for r in pe_ranges(where)) * extent_size(pvg)
        d.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid.snapshot.snapshot_id))
        wait_for(lambda: snap_lv not in ours(pvg), 120, "the store's wipe")
        before = set(ours(pvg))
        n = d.create("after-snap", store, block_cap(), parameters={CLASS: "thick"})
        assert extents(pvg, lv_of(pvg, before)) == where, "the new volume must get the store's extents"
        assert_clean(read_volume(d, n), TENANT)
        d.delete(n)
        d.delete(origin)
    finally:
        finish(d, pvg, base)


def pe_ranges(where: str) -> list[str]:
    """ "/dev/loop3:5-9 /dev/loop4:0-1" -> ["5-9", "0-1"]."""
    return [part.rsplit(":", 1)[1] for part in where.split()]


def slow_wipe_tools(base: str, real: str) -> str:
    """A --tool-path whose blkdiscard zeroes the first half of the LV, notes its
    pid, then hangs: a wipe that is surely running when the kill lands."""
    tools = os.path.join(base, "tools")
    os.makedirs(tools, exist_ok=True)
    script = os.path.join(tools, "blkdiscard")
    with open(script, "w", encoding="utf-8") as f:
        f.write(
            "#!/bin/sh\n"
            "for dev; do :; done\n"
            'half=$(( $(blockdev --getsize64 "$dev") / 2 ))\n'
            f'{real} -z -l "$half" "$dev" || exit 1\n'
            f"echo $$ > {tools}/wipe.pid\n"
            "exec sleep 600\n"
        )
    os.chmod(script, 0o755)
    return tools


def test_an_interrupted_wipe_is_finished_before_the_extents_are_reused(base: str, pvg: GuestVg) -> None:
    real = shutil.which("blkdiscard")
    assert real is not None
    tools = slow_wipe_tools(base, real)
    d = start(base, pvg, "--tool-path", f"{tools}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    w = d.create("wipe-me", 32 * MiB, block_cap(), parameters={CLASS: "thick"})
    lv = lv_of(pvg, set())
    fill(d, w, TENANT, 32 * MiB)
    where = extents(pvg, lv)
    d.delete(w)
    pidfile = os.path.join(tools, "wipe.pid")
    wait_for(lambda: os.path.exists(pidfile) and os.path.getsize(pidfile) > 0, 120, "the wipe to start")
    # The node dies mid-wipe: the driver and its blkdiscard with it.
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    d.proc = None
    d.close_channel()
    with open(pidfile, encoding="utf-8") as f:
        os.killpg(int(f.read()), signal.SIGKILL)
    # Cut off half-way: the first half is zeros, the second still the tenant's.
    left = ours(pvg)
    assert len(left) == 1 and "elv.wipe" in next(r for r in lvs(pvg.name) if r["lv_name"] == left[0])["lv_tags"]
    data = read_lv(pvg, left[0])
    assert data[: 16 * MiB] == bytes(16 * MiB) and TENANT in data[16 * MiB :], "the kill must land mid-wipe"
    # The next driver (with the real tools) finishes the wipe before anything reuses the extents.
    d = start(base, pvg)
    try:
        wait_for(lambda: not ours(pvg), 120, "the wipe after restart")
        # The LV is gone once lvremove ends; the line follows the PVs' flush.
        wait_for(lambda: "wiped and removed" in d.log(), 60, "the wiper's log line")
        n = d.create("next-tenant", 32 * MiB, block_cap(), parameters={CLASS: "thick"})
        assert extents(pvg, lv_of(pvg, set())) == where
        assert_clean(read_volume(d, n), TENANT)
        d.delete(n)
    finally:
        finish(d, pvg, base)
