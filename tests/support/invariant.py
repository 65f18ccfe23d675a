"""Freezes that are proven: a writer keeps an invariant across places, and a
copy taken under its load either shows a state that existed or a torn one.

**The load.** A writer process runs in a tight loop. In round ``n`` it writes
``n`` into each of its places, one after the other, in a fixed order. A place
is one 4 KiB block of a file on a mounted volume; each block repeats a
32-byte record naming the place and ``n``. The places of a volume are:

* ``first`` and ``far``: the first and the last block of a 40 MiB file of
  random bytes, written with O_DIRECT, so every write reaches the device at
  once and the two blocks lie about 40 MiB apart on it: a copy that reads the
  device while the writer runs reads them tens of milliseconds apart, during
  which the writer has moved on many rounds;
* ``cached``: a block of another file written through the page cache, never
  fsynced: only a freeze (which writes the cache back) or luck puts its
  current value on the device.

With several volumes the writer visits ``first`` of each volume, then ``far``
of each, then ``cached`` of each, so the invariant spans volumes.

**The invariant.** At every instant the values, in the writer's order, read
``v0 >= v1 >= ... >= vk >= v0 - 1`` (the writer is part-way through one
round). A point-in-time copy of the filesystems (a snapshot, a group
snapshot, a clone) must restore values that keep it. A copy that reads the
device while the writer runs breaks it almost surely (``far`` and ``first``
come from different rounds), and a copy that skips the freeze loses the cached
block's value (it is many rounds behind). Every proof first shows that with
raw copies of its own (``cp`` of the image or device under load, exactly what
a driver without a freeze would do), so the check is known to be able to fail.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from tests.support.paths import REPO

MiB = 1024 * 1024
BLOCK = 4096
RECORD = 32
MAGIC = b"ELV-INVARIANT-"
_RECORD = re.compile(rb"ELV-INVARIANT-(\d{2})-(\d{14})\n")
DIRECT_FILE = "direct.dat"
CACHED_FILE = "cached.dat"
#: The direct file's size: the distance between ``first`` and ``far``.
SPREAD = 40 * MiB
#: Each proof runs for this many seconds of trials (at least MIN_TRIALS trials).
SECONDS = float(os.environ.get("ELV_FREEZE_SECONDS", "5"))
MIN_TRIALS = int(os.environ.get("ELV_FREEZE_MIN_TRIALS", "3"))
#: Raw copies per proof that must show the check can fail.
RAW_COPIES = 3


class TornBlock(Exception):
    """A place whose block holds records of different rounds (or none)."""


def record(index: int, n: int) -> bytes:
    return b"%s%02d-%014d\n" % (MAGIC, index, n)


def block(index: int, n: int) -> bytes:
    return record(index, n) * (BLOCK // RECORD)


def parse(data: bytes) -> tuple[int, int]:
    """(place index, round) of a place's block; TornBlock if it is not one whole record repeated."""
    m = _RECORD.match(data[:RECORD])
    if m is None or data[:BLOCK] != m.group(0) * (BLOCK // RECORD):
        raise TornBlock(f"not a whole place block: {data[:RECORD]!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class Place:
    path: str
    offset: int
    direct: bool


def prepare(mount_points: list[str]) -> None:
    """Lay out the places of these volumes (round 0) on their mounted filesystems, durably."""
    for mp in mount_points:
        with open(os.path.join(mp, DIRECT_FILE), "wb") as f:
            for _ in range(SPREAD // MiB):
                f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(mp, CACHED_FILE), "wb") as f:
            f.write(bytes(BLOCK))
            f.flush()
            os.fsync(f.fileno())
    for i, p in enumerate(places(mount_points)):
        with open(p.path, "r+b") as f:
            f.seek(p.offset)
            f.write(block(i, 0))
            f.flush()
            os.fsync(f.fileno())


def places(mount_points: list[str]) -> list[Place]:
    """The writer's places over these volumes, in its order (see the module docstring)."""
    out = [Place(os.path.join(m, DIRECT_FILE), 0, True) for m in mount_points]
    out += [Place(os.path.join(m, DIRECT_FILE), SPREAD - BLOCK, True) for m in mount_points]
    out += [Place(os.path.join(m, CACHED_FILE), 0, False) for m in mount_points]
    return out


def device_places(device: str) -> list[Place]:
    """A raw block volume's places: its first block and one SPREAD further
    on, both written with O_DIRECT (a raw device has no freeze to write a
    cache back, so it gets no cached place)."""
    return [Place(device, 0, True), Place(device, SPREAD - BLOCK, True)]


def prepare_device(device: str) -> None:
    """Fill the span between a raw volume's places with random data (a copy
    must read it) and write round 0, durably."""
    with open(device, "r+b") as f:
        for _ in range(SPREAD // MiB):
            f.write(os.urandom(MiB))
        for i, p in enumerate(device_places(device)):
            f.seek(p.offset)
            f.write(block(i, 0))
        f.flush()
        os.fsync(f.fileno())


def _value(f: BinaryIO, i: int, offset: int) -> int:
    """Place ``i``'s round, read at ``offset``; its record must be its own."""
    f.seek(offset)
    idx, n = parse(f.read(BLOCK))
    if idx != i:
        raise TornBlock(f"place {i} holds the record of place {idx}")
    return n


def read_device_values(device: str) -> list[int]:
    with open(device, "rb") as f:
        return [_value(f, i, p.offset) for i, p in enumerate(device_places(device))]


def read_values(mount_points: list[str]) -> list[int]:
    """The values of the places, in the writer's order, as a mounted filesystem shows them."""
    values = []
    for i, p in enumerate(places(mount_points)):
        with open(p.path, "rb") as f:
            values.append(_value(f, i, p.offset))
    return values


def violation(values: list[int]) -> str | None:
    """Why these values are a state that never existed, or None if one did."""
    for i in range(len(values) - 1):
        if values[i] < values[i + 1]:
            return f"place {i} holds round {values[i]} but the later place {i + 1} round {values[i + 1]}: {values}"
    if values[-1] < values[0] - 1:
        return f"place {len(values) - 1} holds round {values[-1]}, more than one behind round {values[0]}: {values}"
    return None


def scan(path: str, count: int) -> dict[int, list[int]]:
    """The rounds of the places found in a raw copy of volumes (an image or
    a device), by their block-aligned records: each place index with every
    round found for it; a block torn inside (records of two rounds) counts
    as round -1, which no existing state has."""
    found: dict[int, list[int]] = {}
    with open(path, "rb") as f:
        offset = 0
        while chunk := f.read(4 * MiB):
            at = chunk.find(MAGIC)
            while at >= 0:
                m = _RECORD.match(chunk, at)
                if (offset + at) % BLOCK == 0 and m is not None and int(m.group(1)) < count:
                    try:
                        found.setdefault(int(m.group(1)), []).append(parse(chunk[at : at + BLOCK])[1])
                    except TornBlock:
                        found.setdefault(int(m.group(1)), []).append(-1)
                at = chunk.find(MAGIC, at + 1)
            offset += len(chunk)
    return found


def raw_copy(src: str, dst: str) -> None:
    """Copy an image as a driver without a freeze would (cp, never sharing
    blocks, which would be one instant on a pool that can), or a block device
    around its page cache (dd with O_DIRECT, as a block copy does: a buffered
    read would serve the pages an earlier copy cached)."""
    if stat.S_ISBLK(os.stat(src).st_mode):
        subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=4M", "iflag=direct", "status=none"], check=True)
    else:
        subprocess.run(["cp", "--reflink=never", "--sparse=always", "--", src, dst], check=True)


class Writer:
    """The writer process over ``places``; ``with Writer(...) as w``."""

    def __init__(self, where: list[Place]) -> None:
        self.places = where
        self.proc: subprocess.Popen[bytes] | None = None
        self.rounds = 0

    def __enter__(self) -> Writer:
        spec = json.dumps([[p.path, p.offset, p.direct] for p in self.places])
        env = dict(os.environ, PYTHONPATH=REPO)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.invariant", spec], stdout=subprocess.PIPE, env=env, cwd=REPO
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready" once the first round is written
        assert line == b"ready\n", f"the writer did not start: {line!r}"
        return self

    def live(self) -> int:
        """The round the first place holds now (read around the device's cache)."""
        p = self.places[0]
        fd = os.open(p.path, os.O_RDONLY | os.O_DIRECT)
        try:
            with mmap.mmap(-1, BLOCK) as buf:
                os.preadv(fd, [buf], p.offset)
                return parse(bytes(buf))[1]
        finally:
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        text = out.decode().strip()
        self.rounds = int(text) if text.isdigit() else 0


@dataclass
class Proof:
    """What one proof found: trials through the driver, and raw copies."""

    what: str
    trials: int = 0
    violations: list[str] = field(default_factory=list)
    raw: int = 0
    raw_torn: int = 0
    raw_examples: list[str] = field(default_factory=list)
    rounds_during: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"freeze proof [{self.what}]: {self.trials} trials in {self.seconds:.1f}s, "
            f"{len(self.violations)} violations, the writer moved {self.rounds_during} rounds during them; "
            f"without a freeze {self.raw_torn}/{self.raw} raw copies were torn"
        )

    def check(self, out: str) -> None:
        """Print the figures (and write them to ci-out/OUT, which scripts/test
        prints), then assert: the load tore a raw copy, enough trials ran,
        and none of them restored a state that never existed."""
        print(self.summary())
        os.makedirs("ci-out", exist_ok=True)
        with open(os.path.join("ci-out", out), "w", encoding="utf-8") as f:
            f.write(self.summary() + "\n")
        if self.raw_examples:
            print(f"  e.g. a raw copy: {self.raw_examples[0]}")
        assert self.raw_torn > 0, f"the load cannot show a torn copy, so it proves nothing: {self.summary()}"
        assert self.trials >= MIN_TRIALS, self.summary()
        assert not self.violations, f"{self.summary()}\n" + "\n".join(self.violations[:5])


def raw_copies(proof: Proof, sources: list[str], count: int, base: str) -> None:
    """Copy ``sources`` (images or devices) with cp under the load, as a
    driver without a freeze would (and never sharing blocks, which would be
    one instant on a pool that can), and count the copies that are torn."""
    for i in range(RAW_COPIES):
        dsts: list[str] = []
        for j, src in enumerate(sources):
            dst = os.path.join(base, f"raw-{i}-{j}.img")
            dsts.append(dst)
            raw_copy(src, dst)
        try:
            found: dict[int, list[int]] = {}
            for d in dsts:  # a place lives on one volume: each copy holds some
                for k, rounds in scan(d, count).items():
                    found.setdefault(k, []).extend(rounds)
        finally:
            for d in dsts:
                os.unlink(d)
        # Every place exactly once, or the scan (not the copy) is broken.
        assert sorted(found) == list(range(count)), f"raw copy {i}: places found {sorted(found)} of {count}"
        assert all(len(r) == 1 for r in found.values()), f"raw copy {i}: a place found twice: {found}"
        values = [found[k][0] for k in range(count)]
        proof.raw += 1
        why = violation(values) if -1 not in values else f"a place's block is torn: {values}"
        if why:
            proof.raw_torn += 1
            proof.raw_examples.append(why)


def trials(proof: Proof, writer: Writer, trial: Callable[[], list[int]]) -> None:
    """Run ``trial`` (one point-in-time copy, restored and read back) until
    the time is up, checking each result and that the writer ran across it."""
    start = time.monotonic()
    while proof.trials < MIN_TRIALS or time.monotonic() - start < SECONDS:
        before = writer.live()
        try:
            values = trial()
        except TornBlock as e:
            values, torn = [], str(e)
        else:
            torn = ""
        after = writer.live()
        proof.trials += 1
        proof.rounds_during += after - before
        why = torn or violation(values)
        if not why and not before - 1 <= values[0] <= after:
            why = f"round {values[0]} is not from the call's time ({before}..{after})"
        if why:
            proof.violations.append(f"trial {proof.trials}: {why}")
    proof.seconds = time.monotonic() - start


def _write_forever(spec: list[tuple[str, int, bool]]) -> int:
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    fds = [os.open(path, os.O_WRONLY | (os.O_DIRECT if direct else 0)) for path, _, direct in spec]
    buf = mmap.mmap(-1, BLOCK)  # page aligned, as O_DIRECT wants
    n = 0
    while not stop:
        n += 1
        for i, (fd, (_, offset, _)) in enumerate(zip(fds, spec, strict=True)):
            buf[:] = block(i, n)
            os.pwrite(fd, buf, offset)
        if n == 1:
            sys.stdout.write("ready\n")
            sys.stdout.flush()
    return n


def main(argv: list[str]) -> None:
    spec = [(str(p), int(o), bool(d)) for p, o, d in json.loads(argv[0])]
    print(_write_forever(spec))


if __name__ == "__main__":
    main(sys.argv[1:])
