"""The power-loss test's replayer (tests/support/logwrites.py) on logs it builds
as the kernel's log-writes target lays them out."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from tests.support.logwrites import DISCARD, FLUSH, FUA, MARK, LogError, Replayer, build_log, read_log

SS = 4096


def blocks(ch: bytes, n: int = 1) -> bytes:
    return ch * (SS * n)


def test_entries_marks_and_points() -> None:
    raw = build_log(
        SS,
        [
            (2, 1, 0, blocks(b"a")),
            (0, 0, FLUSH, b""),
            (5, 2, FUA, blocks(b"b", 2)),
            (0, 0, MARK, "ack-1"),
            (2, 1, DISCARD, b""),
            (7, 1, 0, blocks(b"c")),
        ],
    )
    log = read_log(io.BytesIO(raw))
    assert log.sectorsize == SS and len(log.entries) == 6
    assert [e.index for e in log.entries if e.durable_point] == [1, 2]
    assert log.marks() == {"ack-1": 3}
    assert log.points() == [1, 2, 3]
    # Data follows its entry's block; a discard and a mark carry none.
    assert log.entries[0].data_offset == 2 * SS
    assert log.entries[2].data_offset == 2 * SS + SS + SS + SS
    assert log.entries[5].data_offset == log.entries[4].data_offset + SS


def test_replay_gives_each_crash_state(tmp_path: Path) -> None:
    raw = build_log(
        SS,
        [(2, 1, 0, blocks(b"a")), (0, 0, FLUSH, b""), (2, 1, DISCARD, b""), (3, 2, FUA, blocks(b"b", 2))],
    )
    log = read_log(io.BytesIO(raw))
    target = tmp_path / "disk"
    target.write_bytes(blocks(b"\xff", 8))
    fd = os.open(target, os.O_RDWR)
    try:
        r = Replayer(log, io.BytesIO(raw), fd)
        r.apply_until(1)
        disk = target.read_bytes()
        assert disk[2 * SS : 3 * SS] == blocks(b"a") and disk[3 * SS : 4 * SS] == blocks(b"\xff")
        r.apply_until(3)
        disk = target.read_bytes()
        assert disk[2 * SS : 3 * SS] == bytes(SS), "a discard replays as zeros"
        assert disk[3 * SS : 5 * SS] == blocks(b"b", 2)
        assert disk[:SS] == blocks(b"\xff"), "what no entry wrote is left as it was"
        with pytest.raises(LogError):
            r.apply_until(0)
    finally:
        os.close(fd)


def test_not_a_log_and_a_cut_log_are_refused() -> None:
    with pytest.raises(LogError, match="not a dm-log-writes log"):
        read_log(io.BytesIO(bytes(SS * 2)))
    raw = build_log(SS, [(2, 1, 0, blocks(b"a")), (3, 1, 0, blocks(b"b"))])
    with pytest.raises(LogError, match="cut short"):
        read_log(io.BytesIO(raw[: 3 * SS + 100]))
