"""The power-loss tests' sample and replay loop (tests/support/powerloss.py),
on logs built as the kernel's log-writes target lays them out: they run only
in the guest, so a mistake here would show up only there."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from tests.support.logwrites import FLUSH, MARK, build_log, read_log
from tests.support.powerloss import Sample, State, Step, replay_and_check, sample

SS = 512


def a_log(flushes: int) -> bytes:
    """A write before the start mark, then ``flushes`` flushed writes, each acknowledged by a mark."""
    records: list[tuple[int, int, int, bytes | str]] = [(0, 1, 0, b"x" * SS), (0, 0, MARK, "start")]
    for i in range(flushes):
        records += [(1 + i, 1, FLUSH, bytes([i]) * SS), (0, 0, MARK, f"ack-{i}")]
    return build_log(SS, records)


def test_the_sample_spreads_over_the_log_and_never_goes_below_the_minimum() -> None:
    log = read_log(io.BytesIO(a_log(50)))
    every = sample(log, "start", 0, 10, random.Random(1))
    assert every.points == list(range(1, 102)) and every.chosen == every.points
    assert every.acks == [(3 + 2 * i, i) for i in range(50)]
    spread = sample(log, "start", 100, 10, random.Random(2))
    stride = 101 // 10
    assert len(spread.chosen) >= 10 and spread.chosen[0] < 1 + stride
    assert all(b - a == stride for a, b in zip(spread.chosen, spread.chosen[1:], strict=False))
    # A box too small for one point still samples the minimum.
    assert len(sample(log, "start", 1, 10, random.Random(3), minimum=4).chosen) >= 4


def steps(n: int) -> list[Step]:
    return [Step(f"call {i}", State()) for i in range(n)]


def test_the_replay_checks_the_minimum_past_the_box_and_names_each_violation(tmp_path: Path) -> None:
    raw = a_log(20)
    log = read_log(io.BytesIO(raw))
    target = tmp_path / "disk"
    target.write_bytes(bytes(SS * 32))
    s = Sample(log.points(), [4, 10, 20, 30], sample(log, "start", 0, 1, random.Random(0)).acks)
    seen: list[tuple[int, bytes]] = []

    def check(st: list[Step], ack: int) -> list[str]:
        seen.append((ack, target.read_bytes()[SS : SS * 3]))
        return ["control"] if ack == len(st) - 2 else (["lost"] if ack == 3 else [])

    o = replay_and_check(log, io.BytesIO(raw), str(target), s, steps(20), check, 1e-9, minimum=3)
    assert o.checked == 3  # the box ran out at once; the minimum was still checked
    assert [a for a, _ in seen] == [18, 0, 3, 8]  # the control first, then each point's last ack
    # Entry 4 is the second flush: the disk then holds the first two writes, not the third.
    assert seen[1][1] == bytes([0]) * SS + bytes([1]) * SS
    assert o.violations == ["entry 10 (after call 3): lost"]


def test_a_checker_that_sees_nothing_fails_the_control(tmp_path: Path) -> None:
    raw = a_log(3)
    log = read_log(io.BytesIO(raw))
    target = tmp_path / "disk"
    target.write_bytes(bytes(SS * 8))
    s = sample(log, "start", 0, 1, random.Random(0))
    with pytest.raises(AssertionError, match="the checker found nothing wrong"):
        replay_and_check(log, io.BytesIO(raw), str(target), s, steps(3), lambda st, ack: [], 0)
