"""What the power-loss tests share (tests/lvm/test_power_loss*.py): a
workload through the driver that marks a dm-log-writes log after each
acknowledged call, and the loop that replays the log to its crash states and
checks each one against what the calls acknowledged before it.

A backend's test supplies the storage under the log (a loop pool's
filesystem, or an LVM volume group), its workload's order of calls, and the
check of one crash state; the promises (:class:`State`, :class:`Step`), the
CSI-side comparison, the read-back of fsynced files, the evenly spread,
seeded, time-boxed sample of crash states and the summary line are here."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from csi.v1 import csi_pb2
from tests.support.driver import Driver
from tests.support.logwrites import Log, Replayer
from tests.support.lvm import lvm
from tests.support.rpc import block_cap, mount_cap


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout


def sectors(dev: str) -> int:
    return int(sh("blockdev", "--getsz", dev))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def lvs_for_a_log(
    vg: str,
    sizes: Mapping[str, int],
    zeroed: Collection[str],
    on_top: Sequence[str],
    take_down: Callable[[str], object] | None = None,
) -> Iterator[dict[str, str]]:
    """LVs of the stream's VG (name -> MiB) under a log-writes test: its data
    device, log, replay copy and the throwaway snapshots' store; name -> path.
    At the end the dm devices ``on_top`` of them go first (``take_down`` first
    takes down whatever sits on each), then the LVs."""
    made: dict[str, str] = {}
    try:
        for name, mib in sizes.items():
            lvm("lvcreate", "-y", "-W", "y", "-n", name, "-L", f"{mib}m", vg)
            made[name] = f"/dev/{vg}/{name}"
            if name in zeroed:
                # Zeroed, so the replay copy and the data device start the same.
                sh("blkdiscard", "-f", "-z", made[name])
        yield made
    finally:
        for dev in on_top:
            if take_down is not None and os.path.exists(f"/dev/mapper/{dev}"):
                take_down(f"/dev/mapper/{dev}")
            subprocess.run(["dmsetup", "remove", "--retry", dev], capture_output=True, check=False)
        for name in made:
            lvm("lvremove", "-y", f"{vg}/{name}", check=False)


@dataclass
class State:
    """What the acknowledged calls so far promise."""

    volumes: dict[str, str] = field(default_factory=dict)  # name -> volume ID
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # volume name -> file -> sha256
    snapshots: dict[str, str] = field(default_factory=dict)  # name -> snapshot ID
    sizes: dict[str, int] = field(default_factory=dict)  # volume name -> bytes it was promised

    def copy(self) -> State:
        files = {k: dict(v) for k, v in self.files.items()}
        return State(dict(self.volumes), files, dict(self.snapshots), dict(self.sizes))


@dataclass
class Step:
    """One acknowledged call: what it was, and the state after it."""

    what: str
    after: State
    makes: str | None = None  # the volume or snapshot ID it creates
    removes: str | None = None  # the ID it deletes


class Workload:
    """Calls through the driver; each acknowledged one is recorded with the
    state it promises and marked in the log (``ack-<step>``), so a crash
    state knows which calls had been answered before it."""

    def __init__(self, d: Driver, lw: str) -> None:
        self.d = d
        self.lw = lw  # the log-writes device's dm name
        self.state = State()
        self.steps: list[Step] = []
        self.snap_files: dict[str, dict[str, str]] = {}  # snapshot name -> its files
        self.snap_source: dict[str, str] = {}  # snapshot name -> its source volume's ID
        self.fs: dict[str, str | None] = {}  # volume name -> its filesystem (None: raw block)

    def ack(self, what: str, makes: str | None = None, removes: str | None = None) -> None:
        self.steps.append(Step(what, self.state.copy(), makes, removes))
        sh("dmsetup", "message", self.lw, "0", "mark", f"ack-{len(self.steps) - 1}")

    def target(self, name: str) -> str:
        return self.d.path("pods", name, "t")

    def staging(self, name: str) -> str:
        return self.d.path("st", name)

    def cap(self, name: str) -> csi_pb2.VolumeCapability:
        fs = self.fs[name]
        return mount_cap(fs) if fs else block_cap()

    def create(
        self,
        name: str,
        size: int,
        fs: str | None = "ext4",
        source: str | None = None,
        clone_of: str | None = None,
        parameters: Mapping[str, str] | None = None,
    ) -> None:
        """A new volume; from snapshot ``source`` or a clone of volume ``clone_of``."""
        req = csi_pb2.CreateVolumeRequest(
            name=name,
            volume_capabilities=[mount_cap(fs) if fs else block_cap()],
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            parameters=dict(parameters or {}),
        )
        files: dict[str, str] = {}
        if source:
            req.volume_content_source.snapshot.snapshot_id = self.state.snapshots[source]
            files = dict(self.snap_files[source])
        elif clone_of:
            req.volume_content_source.volume.volume_id = self.state.volumes[clone_of]
            files = dict(self.state.files[clone_of])
        vid = self.d.controller.CreateVolume(req).volume.volume_id
        self.state.volumes[name] = vid
        self.state.files[name] = files
        self.state.sizes[name] = size
        self.fs[name] = fs
        self.ack(f"create {name}", makes=vid)

    def attach(self, name: str) -> None:
        vid, staging = self.state.volumes[name], self.staging(name)
        self.d.stage(vid, staging, self.cap(name))
        self.ack(f"stage {name}")
        os.makedirs(os.path.dirname(self.target(name)), exist_ok=True)
        self.d.publish(vid, staging, self.target(name), self.cap(name))
        self.ack(f"publish {name}")

    def detach(self, name: str) -> None:
        vid = self.state.volumes[name]
        self.d.unpublish(vid, self.target(name))
        self.d.unstage(vid, self.staging(name))
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
        self.snap_source[name] = self.state.volumes[volume]
        self.ack(f"snapshot {name}", makes=sid)

    def expand(self, name: str, size: int, node: bool = False) -> None:
        """ControllerExpandVolume; with ``node``, NodeExpandVolume grows the
        mounted filesystem too (one acknowledged step each)."""
        rng = csi_pb2.CapacityRange(required_bytes=size)
        vid = self.state.volumes[name]
        self.d.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(volume_id=vid, capacity_range=rng)
        )
        self.state.sizes[name] = size
        self.ack(f"expand {name}")
        if node:
            self.d.node.NodeExpandVolume(
                csi_pb2.NodeExpandVolumeRequest(
                    volume_id=vid, volume_path=self.target(name), capacity_range=rng, volume_capability=self.cap(name)
                )
            )
            self.ack(f"node-expand {name}")

    def delete(self, name: str) -> None:
        vid = self.state.volumes.pop(name)
        self.state.files.pop(name, None)
        self.state.sizes.pop(name, None)
        self.d.delete(vid)
        self.ack(f"delete {name}", removes=vid)

    def delete_snapshot(self, name: str) -> None:
        sid = self.state.snapshots.pop(name)
        self.d.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
        self.ack(f"delete snapshot {name}", removes=sid)


def promised_and_ambiguous(steps: list[Step], ack: int) -> tuple[State, set[str]]:
    """What calls 0..ack promise (ack -1: nothing yet), and the IDs the call
    in flight at the crash may or may not have made or removed."""
    promised = steps[ack].after if ack >= 0 else State()
    flight = steps[ack + 1] if ack + 1 < len(steps) else None
    maybe = {x for x in (flight.makes, flight.removes) if x} if flight else set()
    return promised, maybe


def listed(d: Driver) -> tuple[set[str], set[str]]:
    """The volume and snapshot IDs the driver shows through CSI."""
    vols = {e.volume.volume_id for e in d.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries}
    snaps = {e.snapshot.snapshot_id for e in d.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries}
    return vols, snaps


def compare_listing(promised: State, maybe: set[str], vols: set[str], snaps: set[str]) -> list[str]:
    """Every acknowledged object is shown, and nothing else but the call in flight's."""
    bad = []
    for kind, shown, want in (
        ("volume", vols, set(promised.volumes.values())),
        ("snapshot", snaps, set(promised.snapshots.values())),
    ):
        if missing := want - shown - maybe:
            bad.append(f"acknowledged {kind}s lost: {sorted(missing)}")
        if extra := shown - want - maybe:
            bad.append(f"{kind}s shown that no acknowledged call made: {sorted(extra)}")
    return bad


def read_back(
    d: Driver, name: str, vid: str, files: dict[str, str], cap: csi_pb2.VolumeCapability | None = None
) -> list[str]:
    """Stage and publish the volume, and read every promised file back."""
    staging, target = d.path("st", name), d.path("pods", name, "t")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    d.stage(vid, staging, cap)
    d.publish(vid, staging, target, cap)
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


@dataclass
class Sample:
    """The crash states of a log from its start mark on, and those a run checks."""

    points: list[int]  # every flush, FUA write and mark after the start mark
    chosen: list[int]  # an evenly spread subset from a random offset (all of them without a box)
    acks: list[tuple[int, int]]  # (entry index, step) of each ack mark


def sample(log: Log, start_mark: str, box: float, per_point: float, rng: random.Random, minimum: int = 1) -> Sample:
    """Points spread over the whole log, as many as ``box`` seconds hold at
    ``per_point`` each but at least ``minimum`` (box 0: every point)."""
    marks = log.marks()
    start = marks[start_mark]
    acks = sorted((i, int(m[4:])) for m, i in marks.items() if m.startswith("ack-"))
    points = [p for p in log.points() if p >= start]
    budget = max(minimum, int(box / per_point)) if box else len(points)
    stride = max(1, len(points) // max(1, budget))
    return Sample(points, points[rng.randrange(stride) :: stride], acks)


@dataclass
class Outcome:
    checked: int
    violations: list[str]
    seconds: float


#: Check one crash state: (steps, the last acknowledged step at it) -> violations.
Check = Callable[[list[Step], int], list[str]]


def replay_and_check(
    log: Log,
    log_file: BinaryIO,
    target: str,
    s: Sample,
    steps: list[Step],
    check: Check,
    box: float,
    minimum: int = 1,
) -> Outcome:
    """Replay the log onto ``target`` (which starts as the data device
    started) to each chosen point in turn and check it, until ``box``
    seconds have passed (0: no limit) and ``minimum`` points are checked.

    First a control: the checker must be able to see a loss. The earliest
    chosen point, held to everything the workload was ever told but its last
    step (files written long after it), has to fail."""
    fd = os.open(target, os.O_RDWR)
    violations: list[str] = []
    checked = 0
    t0 = time.monotonic()
    try:
        r = Replayer(log, log_file, fd)
        r.apply_until(s.chosen[0])
        control = check(steps, len(steps) - 2)
        assert control, "the checker found nothing wrong in a state from before the workload's writes"
        for p in s.chosen:
            if box and time.monotonic() - t0 > box and checked >= minimum:
                break
            r.apply_until(p)
            ack = max((n for i, n in s.acks if i <= p), default=-1)
            why = check(steps, ack)
            checked += 1
            after = steps[ack].what if ack >= 0 else "nothing"
            violations += [f"entry {p} (after {after}): {v}" for v in why]
    finally:
        os.close(fd)
    return Outcome(checked, violations, time.monotonic() - t0)


def summary(title: str, seed: int, s: Sample, o: Outcome, box: float, path: str) -> str:
    """The figures' line, printed and written to ``path`` (under ci-out)."""
    line = (
        f"{title}: seed={seed} crash states={len(s.points)} checked={o.checked} "
        f"violations={len(o.violations)} seconds={o.seconds:.0f}"
        + (f" (a slice: {box:.0f} s box; make soak checks all)" if o.checked < len(s.points) else "")
    )
    print(line)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        out.write(line + "\n")
    return line
