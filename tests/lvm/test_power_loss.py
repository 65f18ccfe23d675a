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

import os
import random
import subprocess
from collections.abc import Iterator

import pytest

from tests.support.driver import Driver, MiB
from tests.support.logwrites import read_log
from tests.support.lvm import GuestVg
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

BOX = float(os.environ.get("ELV_POWER_SECONDS", "240") or 0)
SEED = int(os.environ.get("ELV_POWER_SEED", str(random.SystemRandom().randrange(1 << 32))))
#: Seconds one point's check may take in the guest while two other streams run
#: (about 9 alone): the sample is spread over the whole log for this many.
PER_POINT = 25.0
#: At least this many points, whatever the box: the box is passed by what checking them takes.
MIN_CHECKED = 5
LW, CHECK = "elv-pl-lw", "elv-pl-check"
SIZES = {"pl-data": 384, "pl-log": 1024, "pl-replay": 384, "pl-cow": 256}  # MiB

pytestmark = pytest.mark.timeout(3600 + (BOX or 20000))


class GuestDriver(Driver):
    """The loop driver in the emulated guest: its Python start takes 5-15 s
    while the other streams keep both vCPUs busy."""

    def wait_ready(self, timeout: float = 120.0) -> None:
        super().wait_ready(timeout)


class LoopWorkload(Workload):
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
    with lvs_for_a_log(vg.name, SIZES, ("pl-data", "pl-replay"), (CHECK, LW)) as made:
        yield made


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
    promised, maybe = promised_and_ambiguous(steps, ack)
    vols, snaps = listed(d)
    bad = compare_listing(promised, maybe, vols, snaps)
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
        w = LoopWorkload(d, LW)
        w.run(rng)
        assert d.stop() == 0, d.log()[-3000:]
    finally:
        if d.proc is not None:
            d.kill()
        subprocess.run(["umount", "-R", d.pool], capture_output=True, check=False)
        sh("dmsetup", "remove", "--retry", LW)
    with open(devs["pl-log"], "rb") as f:
        log = read_log(f)
        s = sample(log, "pool-made", BOX, PER_POINT, rng, MIN_CHECKED)
        print(
            f"power loss: seed={SEED} log entries={len(log.entries)} crash states={len(s.points)} "
            f"checking {len(s.chosen)}"
        )

        def check(steps: list[Step], ack: int) -> list[str]:
            return check_point(os.path.join(base, "chk"), devs["pl-replay"], devs["pl-cow"], steps, ack)

        o = replay_and_check(log, f, devs["pl-replay"], s, w.steps, check, BOX, MIN_CHECKED)
    summary("power loss test", SEED, s, o, BOX, "ci-out/power-loss-summary.txt")
    assert o.checked >= min(len(s.points), MIN_CHECKED), f"only {o.checked} crash states checked"
    assert not o.violations, "\n".join(o.violations[:30])
