"""Power loss on the loop backend: every crash state of a real workload.

A SIGKILL keeps the page cache, so the crash tests cannot find a missing
fsync. Here the loop pool's filesystem sits on device-mapper's log-writes
target (tests/support/logwrites.py): every write that reaches stable storage
is logged in order. A workload runs through the driver (create, stage,
write and fsync, snapshot, clone, expand, delete) and marks the log after
each acknowledged call. Then the log is replayed onto a copy of the starting
disk, to each flush, FUA write and mark in turn: the disk as a power cut
there would have left it. At each point, on a throwaway snapshot of it, the
pool is mounted, a new driver starts, and the test checks that every call
acknowledged before the point holds (its volume or snapshot exists, every
file fsynced before it reads back with its checksum, a deleted one is gone),
that nothing else is visible but the call in flight, and that startup left
no image or temporary file without its metadata.

Checking a point costs a driver start and a few mounts (about 9 s under the
guest's emulation): CI checks the points that fit in ELV_POWER_SECONDS
(default 240 in CI), an evenly spread sample from a printed seed (ELV_POWER_SEED
replays it); ``make soak`` sets ELV_POWER_SECONDS=0, every point.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from csi.v1 import csi_pb2
from tests.support.driver import Driver, MiB
from tests.support.logwrites import Replayer, read_log
from tests.support.lvm import GuestVg, lvm
from tests.support.rpc import block_cap, mount_cap

BOX = float(os.environ.get("ELV_POWER_SECONDS", "240") or 0)
SEED = int(os.environ.get("ELV_POWER_SEED", str(random.SystemRandom().randrange(1 << 32))))
#: Seconds one point's check may take in the guest while two other streams run
#: (about 9 alone): the sample is spread over the whole log for this many.
PER_POINT = 25.0
LW, CHECK = "elv-pl-lw", "elv-pl-check"
SIZES = {"pl-data": 384, "pl-log": 1024, "pl-replay": 384, "pl-cow": 256}  # MiB

pytestmark = pytest.mark.timeout(3600 + (BOX or 20000))


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout


def sectors(dev: str) -> int:
    return int(sh("blockdev", "--getsz", dev))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class State:
    """What the acknowledged calls so far promise."""

    volumes: dict[str, str] = field(default_factory=dict)  # name -> volume ID
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # volume name -> file -> sha256
    snapshots: dict[str, str] = field(default_factory=dict)  # name -> snapshot ID

    def copy(self) -> State:
        return State(dict(self.volumes), {k: dict(v) for k, v in self.files.items()}, dict(self.snapshots))


@dataclass
class Step:
    """One acknowledged call: what it was, and the state after it."""

    what: str
    after: State
    makes: str | None = None  # the volume or snapshot ID it creates
    removes: str | None = None  # the ID it deletes


class GuestDriver(Driver):
    """The loop driver in the emulated guest: its Python start takes 5-15 s
    while the other streams keep both vCPUs busy."""

    def wait_ready(self, timeout: float = 120.0) -> None:
        super().wait_ready(timeout)


class Workload:
    def __init__(self, d: Driver) -> None:
        self.d = d
        self.state = State()
        self.steps: list[Step] = []
        self.snap_files: dict[str, dict[str, str]] = {}  # snapshot name -> its files

    def ack(self, what: str, makes: str | None = None, removes: str | None = None) -> None:
        self.steps.append(Step(what, self.state.copy(), makes, removes))
        sh("dmsetup", "message", LW, "0", "mark", f"ack-{len(self.steps) - 1}")

    def target(self, name: str) -> str:
        return self.d.path("pods", name, "t")

    def create(self, name: str, size: int, fs: str | None = "ext4", source: str | None = None) -> None:
        req = csi_pb2.CreateVolumeRequest(
            name=name,
            volume_capabilities=[mount_cap(fs) if fs else block_cap()],
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        )
        if source:
            req.volume_content_source.snapshot.snapshot_id = self.state.snapshots[source]
        vid = self.d.controller.CreateVolume(req).volume.volume_id
        self.state.volumes[name] = vid
        self.state.files[name] = dict(self.snap_files.get(source, {})) if source else {}
        self.ack(f"create {name}", makes=vid)

    def attach(self, name: str) -> None:
        vid, staging = self.state.volumes[name], self.d.path("st", name)
        self.d.stage(vid, staging)
        self.ack(f"stage {name}")
        os.makedirs(os.path.dirname(self.target(name)), exist_ok=True)
        self.d.publish(vid, staging, self.target(name))
        self.ack(f"publish {name}")

    def detach(self, name: str) -> None:
        vid = self.state.volumes[name]
        self.d.unpublish(vid, self.target(name))
        self.d.unstage(vid, self.d.path("st", name))
        self.ack(f"detach {name}")

    def write(self, name: str, file: str, size: int, rng: random.Random) -> None:
        data = rng.randbytes(size)
        with open(os.path.join(self.target(name), file), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.state.files[name][file] = sha(data)
        self.ack(f"write {name}/{file}")

    def snapshot(self, name: str, volume: str) -> None:
        req = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=self.state.volumes[volume])
        sid = self.d.controller.CreateSnapshot(req).snapshot.snapshot_id
        self.state.snapshots[name] = sid
        self.snap_files[name] = dict(self.state.files[volume])
        self.ack(f"snapshot {name}", makes=sid)

    def expand(self, name: str, size: int) -> None:
        rng = csi_pb2.CapacityRange(required_bytes=size)
        vid = self.state.volumes[name]
        self.d.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(volume_id=vid, capacity_range=rng)
        )
        self.ack(f"expand {name}")

    def delete(self, name: str) -> None:
        vid = self.state.volumes.pop(name)
        self.state.files.pop(name, None)
        self.d.delete(vid)
        self.ack(f"delete {name}", removes=vid)

    def delete_snapshot(self, name: str) -> None:
        sid = self.state.snapshots.pop(name)
        self.d.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
        self.ack(f"delete snapshot {name}", removes=sid)

    def run(self, rng: random.Random) -> None:
        self.create("v1", 48 * MiB)
        self.attach("v1")
        self.write("v1", "a", 300_000, rng)
        self.snapshot("s1", "v1")
        self.write("v1", "b", 200_000, rng)
        self.create("v2", 48 * MiB, source="s1")
        self.attach("v2")
        self.write("v2", "c", 100_000, rng)
        self.expand("v1", 64 * MiB)
        self.create("v3", 32 * MiB, fs=None)
        self.delete("v3")
        self.delete_snapshot("s1")
        self.write("v1", "d", 50_000, rng)
        self.detach("v2")
        self.delete("v2")
        self.detach("v1")


@pytest.fixture
def lvs_for_the_log(vg: GuestVg) -> Iterator[dict[str, str]]:
    made: dict[str, str] = {}
    try:
        for name, mib in SIZES.items():
            lvm("lvcreate", "-y", "-W", "y", "-n", name, "-L", f"{mib}m", vg.name)
            made[name] = f"/dev/{vg.name}/{name}"
            if name in ("pl-data", "pl-replay"):
                # Zeroed, so the replay copy and the data device start the same.
                sh("blkdiscard", "-f", "-z", made[name])
        yield made
    finally:
        for dev in (CHECK, LW):
            subprocess.run(["dmsetup", "remove", "--retry", dev], capture_output=True, check=False)
        for name in made:
            lvm("lvremove", "-y", f"{vg.name}/{name}", check=False)


def check_point(base: str, replay: str, cow: str, steps: list[Step], ack: int) -> list[str]:
    """Mount a throwaway snapshot of the replayed disk, start a driver on it and
    compare what it shows with what calls 0..ack promised (ack -1: none yet)."""
    sh("dmsetup", "create", CHECK, "--table", f"0 {sectors(replay)} snapshot {replay} {cow} N 8")
    d = GuestDriver(base)
    os.makedirs(d.pool, exist_ok=True)
    sh("mount", "-t", "ext4", f"/dev/mapper/{CHECK}", d.pool)
    bad: list[str] = []
    try:
        d.start()
        bad = compare(d, steps, ack)
        rc = d.stop()
        if rc != 0 or "Traceback" in d.log():
            bad.append(f"the driver exited with {rc}: {d.log()[-2000:]}")
    finally:
        if d.proc is not None:
            d.kill()
        subprocess.run(["umount", "-R", d.pool], capture_output=True, check=False)
        for sub in ("st", "pods"):
            subprocess.run(["umount", "-R", d.path(sub)], capture_output=True, check=False)
        sh("dmsetup", "remove", "--retry", CHECK)
        subprocess.run(["rm", "-rf", "--one-file-system", base], check=False)
    return bad


def compare(d: Driver, steps: list[Step], ack: int) -> list[str]:
    promised = steps[ack].after if ack >= 0 else State()
    flight = steps[ack + 1] if ack + 1 < len(steps) else None
    maybe = {x for x in (flight.makes, flight.removes) if x} if flight else set()
    vols = {e.volume.volume_id for e in d.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries}
    snaps = {e.snapshot.snapshot_id for e in d.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries}
    bad = []
    for kind, shown, want in (
        ("volume", vols, set(promised.volumes.values())),
        ("snapshot", snaps, set(promised.snapshots.values())),
    ):
        if missing := want - shown - maybe:
            bad.append(f"acknowledged {kind}s lost: {sorted(missing)}")
        if extra := shown - want - maybe:
            bad.append(f"{kind}s shown that no acknowledged call made: {sorted(extra)}")
    # Startup removed what an unfinished create or delete left: no image without metadata, no temp file.
    for sub, shown in (("volumes", vols), ("snapshots", snaps)):
        images = {f[: -len(".img")] for f in os.listdir(os.path.join(d.pool, sub)) if f.endswith(".img")}
        if stray := images - shown:
            bad.append(f"{sub} images without their object after startup: {sorted(stray)}")
    if left := os.listdir(os.path.join(d.pool, "tmp")):
        bad.append(f"temporary files after startup: {left}")
    for name, vid in promised.volumes.items():
        if vid in vols and promised.files.get(name):
            bad += read_back(d, name, vid, promised.files[name])
    return bad


def read_back(d: Driver, name: str, vid: str, files: dict[str, str]) -> list[str]:
    staging, target = d.path("st", name), d.path("pods", name, "t")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    d.stage(vid, staging)
    d.publish(vid, staging, target)
    bad = []
    try:
        for file, digest in files.items():
            try:
                with open(os.path.join(target, file), "rb") as f:
                    got = sha(f.read())
            except OSError as e:
                bad.append(f"{name}/{file} fsynced and acknowledged, now unreadable: {e}")
                continue
            if got != digest:
                bad.append(f"{name}/{file} fsynced and acknowledged, now other bytes")
    finally:
        d.unpublish(vid, target)
        d.unstage(vid, staging)
    return bad


def test_every_crash_state_keeps_what_was_acknowledged(base: str, vg: GuestVg, lvs_for_the_log: dict[str, str]) -> None:
    devs = lvs_for_the_log
    sh("modprobe", "dm_log_writes")
    sh(
        "dmsetup",
        "create",
        LW,
        "--table",
        f"0 {sectors(devs['pl-data'])} log-writes {devs['pl-data']} {devs['pl-log']}",
    )
    lw = f"/dev/mapper/{LW}"
    d = GuestDriver(base)
    os.makedirs(d.pool, exist_ok=True)
    rng = random.Random(SEED)
    try:
        sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", lw)
        sh("mount", "-t", "ext4", lw, d.pool)
        sh("dmsetup", "message", LW, "0", "mark", "pool-made")
        d.start()
        w = Workload(d)
        w.run(rng)
        assert d.stop() == 0, d.log()[-3000:]
    finally:
        if d.proc is not None:
            d.kill()
        subprocess.run(["umount", "-R", d.pool], capture_output=True, check=False)
        sh("dmsetup", "remove", "--retry", LW)
    with open(devs["pl-log"], "rb") as f:
        log = read_log(f)
        marks = log.marks()
        start = marks["pool-made"]
        acks = sorted((i, int(m[4:])) for m, i in marks.items() if m.startswith("ack-"))
        points = [p for p in log.points() if p >= start]
        budget = int(BOX / PER_POINT) if BOX else len(points)
        stride = max(1, len(points) // max(1, budget))
        chosen = points[rng.randrange(stride) :: stride]
        print(
            f"power loss: seed={SEED} log entries={len(log.entries)} crash states={len(points)} checking {len(chosen)}"
        )
        fd = os.open(devs["pl-replay"], os.O_RDWR)
        violations: list[str] = []
        checked = 0
        t0 = time.monotonic()
        try:
            r = Replayer(log, f, fd)
            # The checker must be able to see a loss: the earliest point, held
            # to everything the workload was ever told (files written long
            # after it), has to fail.
            r.apply_until(chosen[0])
            control = check_point(
                os.path.join(base, "chk"), devs["pl-replay"], devs["pl-cow"], w.steps, len(w.steps) - 2
            )
            assert control, "the checker found nothing wrong in a state from before the workload's writes"
            for p in chosen:
                if BOX and time.monotonic() - t0 > BOX:
                    break
                r.apply_until(p)
                ack = max((n for i, n in acks if i <= p), default=-1)
                why = check_point(os.path.join(base, "chk"), devs["pl-replay"], devs["pl-cow"], w.steps, ack)
                checked += 1
                violations += [f"entry {p} (after {w.steps[ack].what if ack >= 0 else 'nothing'}): {v}" for v in why]
        finally:
            os.close(fd)
    line = (
        f"power loss test: seed={SEED} crash states={len(points)} checked={checked} "
        f"violations={len(violations)} seconds={time.monotonic() - t0:.0f}"
        + (f" (a slice: {BOX:.0f} s box; make soak checks all)" if checked < len(points) else "")
    )
    print(line)
    os.makedirs("ci-out", exist_ok=True)
    with open("ci-out/power-loss-summary.txt", "w") as out:
        out.write(line + "\n")
    assert checked >= min(len(points), 5), f"only {checked} crash states checked"
    assert not violations, "\n".join(violations[:30])
