"""Power loss on the LVM backend: every crash state of a real workload.

The LVM half of tests/lvm/test_power_loss.py. Here the only PV of a volume
group is a dm-log-writes device (tests/support/logwrites.py), so every write
that reaches stable storage, LVM's metadata and dm-thin's and dm-snapshot's
included, is logged in order. The VG holds a thin pool; a workload runs
through ``elv serve --backend lvm`` on thick and thin classes (create ext4
and xfs volumes, stage, write and fsync, COW and thin snapshots, a thin clone
of a snapshot and a thick clone of a volume, online expansion, delete of a
volume and of snapshots) and marks the log after each acknowledged call.

The log is then replayed onto a copy of the starting disk, to each flush,
FUA write and mark in turn. At each point, on a throwaway dm-snapshot of the
replayed disk, a new driver starts and the test checks that every call
acknowledged before the point holds (ListVolumes and ListSnapshots, and the
exact LV and tags in LVM's own report: owner, kind, name, filesystem, source,
thin or thick, size), that every file fsynced before it reads back with its
checksum, that nothing else is shown but the call in flight's object, and
that startup left no half-made LV of ELV's (pending, or a clone's temporary
source) neither shown nor quarantined.

Every PV label of the VG is on the data disk, the replay disk, and the
log-writes or check device stacked on them: the same VG UUID on several
devices. The data and replay disks are LVs of the stream's VG, which LVM
never scans for PVs (devices/scan_lvs=0, Debian's default), so only the one
dm device on top is a candidate at any time; still, every LVM command of the
test names that device with ``--devices``, and the driver gets an ``lvm``
wrapper on its ``--tool-path`` that does the same (the driver itself has no
setting that narrows LVM's device scan: ``--lvm-devices`` picks empty disks
to build a VG from). The driver's resident lvm shells (reports and changes)
start as a bare ``lvm``, which takes no ``--devices``: their commands scan
every device, so at the workload's start and at each point the test asks an
lvm without ``--devices`` too, and requires it to see the one device and no
duplicate. A duplicate PV would let LVM pick the final state's disk instead
of the crash state's, and the test would check the wrong disk.

Checking a point costs a driver start, activations and a stage of every
volume holding files (17-45 s under the guest's emulation): CI checks
the points that fit in ELV_LVM_POWER_SECONDS (default 180), evenly spread from
a printed seed (ELV_LVM_POWER_SEED replays it); ``make soak`` sets 0, every point.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from csi.model import DEVICE_CLASS
from tests.support.driver import MiB
from tests.support.logwrites import read_log
from tests.support.lvm import OWNER_TAG, GuestVg, LvmDriver, class_config, lvm, wait_for, write_config
from tests.support.powerloss import (
    Step,
    Workload,
    compare_listing,
    listed,
    lvs_for_a_log,
    promised_and_ambiguous,
    read_back,
    replay_and_check,
    sample,
    sectors,
    sh,
    summary,
)
from tests.support.rpc import block_cap, mount_cap
from tests.support.wrappers import SAFE

BOX = float(os.environ.get("ELV_LVM_POWER_SECONDS", "180") or 0)
SEED = int(os.environ.get("ELV_LVM_POWER_SEED", str(random.SystemRandom().randrange(1 << 32))))
#: Seconds one point's check takes in the guest (17 alone, 44 with another
#: guest on the host's two cores): the sample is spread over the whole log for this many.
PER_POINT = 30.0
#: At least this many points, whatever the box (fewer would prove little):
#: the box is passed by what checking them takes.
MIN_CHECKED = 3
LW, CHECK = "elv-lpl-lw", "elv-lpl-chk"
SIZES = {"lpl-data": 768, "lpl-log": 2048, "lpl-replay": 768, "lpl-cow": 512}  # MiB
POOL = "pool0"
THICK, THIN = {DEVICE_CLASS: "thick"}, {DEVICE_CLASS: "thin"}
#: The thin pool is 256 MiB; the class may promise 8 times that (xfs needs
#: 300 MiB volumes, and a thin snapshot and a clone count their full size).
RATIO = 8.0
FIELDS = "lv_name,lv_size,lv_tags,pool_lv,origin"

pytestmark = pytest.mark.timeout(3600 + (BOX or 30000))


def lvm_on(dev: str, command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """LVM seeing only ``dev``: the one device that carries the test VG's PV now."""
    return lvm(command, "--devices", dev, *args, check=check)


def lvs_on(dev: str, vg: str) -> dict[str, dict[str, str]]:
    """The test VG's LVs as LVM itself reports them (never the driver's view)."""
    out = lvm_on(dev, "lvs", "-a", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", FIELDS, vg).stdout
    return {r["lv_name"]: r for r in json.loads(out)["report"][0]["lv"]}


def sole_pv(vg: str, dev: str) -> list[str]:
    """Violations unless an lvm that scans every device (as the driver's
    shells do) finds the VG's PV on ``dev`` alone."""
    res = lvm("pvs", "--reportformat", "json", "-o", "pv_name,vg_name", check=False)
    rows = json.loads(res.stdout)["report"][0]["pv"] if res.stdout.strip() else []
    pvs = sorted({os.path.realpath(r["pv_name"]) for r in rows if r["vg_name"] == vg})
    bad = [] if pvs == [os.path.realpath(dev)] else [f"an unrestricted scan finds {vg}'s PVs on {pvs}, not {dev}"]
    if "duplicate" in res.stderr.lower() or "not using device" in res.stderr.lower():
        bad.append(f"an unrestricted scan sees a duplicate PV: {res.stderr.strip()[:500]}")
    return bad


def devices_wrapper(directory: str, dev: str) -> str:
    """A ``--tool-path`` whose ``lvm`` sees only ``dev``."""
    os.makedirs(directory, exist_ok=True)
    real = shutil.which("lvm", path=SAFE)
    assert real, "lvm is not installed"
    with open(os.path.join(directory, "lvm"), "w", encoding="utf-8") as f:
        f.write(f'#!/bin/sh\n[ $# -gt 0 ] || exec {real}\ncmd=$1; shift\nexec {real} "$cmd" --devices {dev} "$@"\n')
    os.chmod(os.path.join(directory, "lvm"), 0o755)
    return f"{directory}:{SAFE}"


def lvm_driver(base: str, vg: str, dev: str) -> LvmDriver:
    os.makedirs(base, exist_ok=True)
    cfg = write_config(os.path.join(base, "lvm.toml"), class_config(GuestVg(vg, POOL, [dev], []), ratio=RATIO))
    return LvmDriver(base, ["--lvm-config", cfg, "--tool-path", devices_wrapper(os.path.join(base, "bin"), dev)])


def dm_names() -> list[str]:
    out = sh("dmsetup", "ls")
    return [] if out.startswith("No devices") else [line.split()[0] for line in out.splitlines() if line.strip()]


def deactivate(vg: str, dev: str) -> list[str]:
    """Take every LV of the test VG down, so the device under it can go;
    return the dm devices of the VG that are left."""
    lvm_on(dev, "vgchange", "-an", vg, check=False)
    for _ in range(3):  # thin LVs before their pool, snapshots before their origin
        left = [n for n in dm_names() if n.startswith(vg + "-")]
        if not left:
            return []
        for n in left:
            subprocess.run(["dmsetup", "remove", "--retry", n], capture_output=True, check=False)
    return [n for n in dm_names() if n.startswith(vg + "-")]


def unmount_under(path: str) -> None:
    """Unmount whatever a driver or a check left beneath ``path``, deepest first."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        mps = [line.split()[4] for line in f]
    for mp in sorted((m for m in mps if m == path or m.startswith(path.rstrip("/") + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)


class LvmWorkload(Workload):
    def run(self, rng: random.Random) -> None:
        self.create("tk", 64 * MiB, "ext4", parameters=THICK)
        self.attach("tk")
        self.write("tk", "a", 300_000, rng)
        self.create("tn", 320 * MiB, "xfs", parameters=THIN)
        self.attach("tn")
        self.write("tn", "b", 200_000, rng)
        self.snapshot("stk", "tk")  # copy-on-write
        self.snapshot("stn", "tn")  # thin
        # After the COW snapshot: the origin's old blocks are copied out first.
        self.write("tk", "c", 100_000, rng)
        self.create("ctn", 320 * MiB, "xfs", source="stn", parameters=THIN)  # a thin snapshot of it
        self.create("ctk", 64 * MiB, "ext4", clone_of="tk", parameters=THICK)  # a block copy, pending until done
        self.expand("tn", 384 * MiB, node=True)
        self.write("tn", "d", 100_000, rng)
        self.create("blk", 16 * MiB, None, parameters=THICK)
        self.delete("blk")  # quarantined, then zeroed in the background
        self.delete_snapshot("stk")  # a COW snapshot is zeroed too
        self.delete_snapshot("stn")
        self.delete("ctk")
        self.detach("tk")
        self.detach("tn")


@pytest.fixture
def lvs_for_the_log(vg: GuestVg) -> Iterator[dict[str, str]]:
    tvg = vg_on_the_log(vg)
    with lvs_for_a_log(
        vg.name, SIZES, ("lpl-data", "lpl-replay"), (CHECK, LW), lambda dev: deactivate(tvg, dev)
    ) as made:
        yield made


def vg_on_the_log(vg: GuestVg) -> str:
    """The VG on the log-writes device: named after the stream's, so streams never share one."""
    return f"{vg.name}pl"


class Checker:
    """One crash state: a throwaway snapshot of the replayed disk, a new
    driver on it, and what it shows compared with what calls 0..ack promised."""

    def __init__(self, base: str, vg: str, replay: str, cow: str, w: LvmWorkload) -> None:
        self.base, self.vg, self.replay, self.cow, self.w = base, vg, replay, cow, w

    def __call__(self, steps: list[Step], ack: int) -> list[str]:
        sh("dmsetup", "create", CHECK, "--table", f"0 {sectors(self.replay)} snapshot {self.replay} {self.cow} N 8")
        dev = f"/dev/mapper/{CHECK}"
        d = lvm_driver(self.base, self.vg, dev)
        # A forked pre-imported interpreter (tests/support/forked.py) saves
        # the four seconds a fresh Python spends importing grpc per point.
        d.fork = True
        bad: list[str] = []
        try:
            d.start()
            bad = self.compare(d, dev, steps, ack)
            rc = d.stop()
            if rc != 0 or "Traceback" in d.log():
                bad.append(f"the driver exited with {rc}: {d.log()[-2000:]}")
        except (grpc.RpcError, RuntimeError, TimeoutError) as e:
            # A driver that cannot start or serve after the power cut is a violation, not a crash of the test.
            bad.append(f"{type(e).__name__}: {str(e)[:1500]}\ndriver log: {d.log()[-2000:]}")
        finally:
            if d.proc is not None:
                d.kill()
            unmount_under(d.kubelet)
            left = deactivate(self.vg, dev)
            sh("dmsetup", "remove", "--retry", CHECK)
            subprocess.run(["rm", "-rf", "--one-file-system", self.base], check=False)
        assert not left, f"dm devices of the test VG left active: {left}"
        return bad

    def compare(self, d: LvmDriver, dev: str, steps: list[Step], ack: int) -> list[str]:
        promised, maybe = promised_and_ambiguous(steps, ack)
        vols, snaps = listed(d)
        bad = sole_pv(self.vg, dev) + compare_listing(promised, maybe, vols, snaps)
        rows = lvs_on(dev, self.vg)
        # Each acknowledged object is its LV, with the tags the driver gave it
        # (the call in flight may have removed its own).
        for name, vid in promised.volumes.items():
            if vid in maybe:
                continue
            fs = self.w.fs[name]
            want = {OWNER_TAG, "elv.kind=v", f"elv.name={name.encode().hex()}"} | ({f"elv.fs={fs}"} if fs else set())
            bad += self.lv_holds(rows, vid, want, promised.sizes[name], thin=vid.startswith("v-thin-"))
        for name, sid in promised.snapshots.items():
            if sid in maybe:
                continue
            src = self.w.snap_source[name]
            want = {OWNER_TAG, "elv.kind=s", f"elv.name={name.encode().hex()}", f"elv.src={src}"}
            bad += self.lv_holds(rows, sid, want, 0, thin=sid.startswith("s-thin-"), origin=f"elv-{src}")
        # Startup quarantined whatever an interrupted call left half-made: every
        # other LV of ELV's is an object CSI shows, or tagged for the wiper.
        for lv_name, r in rows.items():
            tags = set(r["lv_tags"].split(","))
            if OWNER_TAG not in tags or "elv.wipe" in tags:
                continue
            if lv_name.removeprefix("elv-") not in vols | snaps or "elv.pending" in tags:
                bad.append(f"LV {lv_name} is ELV's, neither shown nor quarantined after startup: {sorted(tags)}")
        for name, vid in promised.volumes.items():
            if vid in vols and promised.files.get(name):
                fs = self.w.fs[name]
                bad += read_back(d, name, vid, promised.files[name], mount_cap(fs) if fs else block_cap())
        return bad

    @staticmethod
    def lv_holds(
        rows: dict[str, dict[str, str]], oid: str, want: set[str], size: int, *, thin: bool, origin: str = ""
    ) -> list[str]:
        r = rows.get(f"elv-{oid}")
        if r is None:
            return [f"{oid}: acknowledged, but LVM has no LV elv-{oid}"]
        tags = set(r["lv_tags"].split(","))
        bad = []
        if missing := want - tags:
            bad.append(f"{oid}: tags {sorted(missing)} missing from {sorted(tags)}")
        if held := tags & {"elv.pending", "elv.wipe"}:
            bad.append(f"{oid}: acknowledged, but tagged {sorted(held)}")
        if (r["pool_lv"] == POOL) != thin:
            bad.append(f"{oid}: pool_lv is {r['pool_lv']!r}, the class is {'thin' if thin else 'thick'}")
        if int(r["lv_size"]) < size:
            bad.append(f"{oid}: {r['lv_size']} bytes, {size} were acknowledged")
        if origin and r["origin"] != origin:
            bad.append(f"{oid}: its origin is {r['origin']!r}, not {origin}")
        return bad


def test_every_crash_state_keeps_what_was_acknowledged(base: str, vg: GuestVg, lvs_for_the_log: dict[str, str]) -> None:
    devs, tvg = lvs_for_the_log, vg_on_the_log(vg)
    sh("modprobe", "dm_log_writes")
    sh(
        "dmsetup",
        "create",
        LW,
        "--table",
        f"0 {sectors(devs['lpl-data'])} log-writes {devs['lpl-data']} {devs['lpl-log']}",
    )
    lw = f"/dev/mapper/{LW}"
    work = os.path.join(base, "work")
    os.makedirs(work)
    d = lvm_driver(work, tvg, lw)
    rng = random.Random(SEED)
    try:
        lvm_on(lw, "pvcreate", "-q", "-y", lw)
        lvm_on(lw, "vgcreate", "-q", tvg, lw)
        lvm_on(lw, "lvcreate", "-q", "-y", "--type", "thin-pool", "-Z", "y", "-n", POOL, "-L", "256m", tvg)
        sh("dmsetup", "message", LW, "0", "mark", "vg-made")
        d.start()
        assert not sole_pv(tvg, lw), sole_pv(tvg, lw)
        w = LvmWorkload(d, LW)
        w.run(rng)

        def wiped() -> bool:
            return not any("elv.wipe" in r["lv_tags"].split(",") for r in lvs_on(lw, tvg).values())

        # The log holds each delete's whole life: quarantine, wipe, removal.
        wait_for(wiped, 600, "the wiper to finish")
        assert d.stop() == 0, d.log()[-3000:]
    finally:
        if d.proc is not None:
            d.kill()
        unmount_under(d.kubelet)
        left = deactivate(tvg, lw)
        sh("dmsetup", "remove", "--retry", LW)
    assert not left, f"dm devices of the test VG left active: {left}"
    with open(devs["lpl-log"], "rb") as f:
        log = read_log(f)
        s = sample(log, "vg-made", BOX, PER_POINT, rng, MIN_CHECKED)
        print(
            f"lvm power loss: seed={SEED} log entries={len(log.entries)} crash states={len(s.points)} "
            f"checking {len(s.chosen)} steps={len(w.steps)}"
        )
        check = Checker(os.path.join(base, "chk"), tvg, devs["lpl-replay"], devs["lpl-cow"], w)
        o = replay_and_check(log, f, devs["lpl-replay"], s, w.steps, check, BOX, MIN_CHECKED)
    summary("lvm power loss test", SEED, s, o, BOX, "ci-out/lvm-power-loss-summary.txt")
    assert o.checked >= min(len(s.points), MIN_CHECKED), f"only {o.checked} crash states checked"
    assert not o.violations, "\n".join(o.violations[:30])
