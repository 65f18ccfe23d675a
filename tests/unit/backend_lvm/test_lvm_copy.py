"""The block copy of LVM clones, on plain files (O_DIRECT works on them as on
block devices): a sparse copy writes only what holds data, so a clone into a
thin pool maps only that; and a copy stops between chunks when told to."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from csi.backend.lvm.clone import CHUNK, copy_blocks
from csi.host.stoppable import Stopped

KiB = 1024
MiB = 1024 * KiB
GRAIN = 64 * KiB


def make_source(path: Path, size: int, data_at: list[int]) -> bytes:
    buf = bytearray(size)
    for off in data_at:
        buf[off : off + 100] = b"D" * min(100, size - off)
    path.write_bytes(bytes(buf))
    return bytes(buf)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("sparse", [0, GRAIN])
def test_a_sparse_copy_writes_only_the_grains_with_data(tmp_path: Path, sparse: int) -> None:
    size = 3 * CHUNK
    # Data at the start, inside grain 3, across a chunk boundary and in the last grain.
    data_at = [0, 3 * GRAIN + 5, CHUNK - 50, size - 100]
    src, dst = tmp_path / "src", tmp_path / "dst"
    expected = make_source(src, size, data_at)
    with open(dst, "wb") as f:
        f.truncate(size)
    written = copy_blocks(str(src), str(dst), size, "test", sparse=sparse)
    assert dst.read_bytes() == expected
    grains = {off // GRAIN for off in data_at} | {(off + 99) // GRAIN for off in data_at}
    if sparse:
        assert written == len(grains) * GRAIN
        assert allocated(dst) <= written, "zero grains must not be written (a thin pool would map them)"
    else:
        assert written == size and allocated(dst) >= size


def test_an_all_zero_source_writes_nothing(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src, 2 * CHUNK, [])
    with open(dst, "wb") as f:
        f.truncate(2 * CHUNK)
    assert copy_blocks(str(src), str(dst), 2 * CHUNK, "zeros", sparse=GRAIN) == 0
    assert allocated(dst) == 0


def test_a_copy_stops_between_chunks(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src, 2 * CHUNK, [0])
    dst.write_bytes(b"")
    with open(dst, "wb") as f:
        f.truncate(2 * CHUNK)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        copy_blocks(str(src), str(dst), 2 * CHUNK, "stopped", stop=stop)
    assert allocated(dst) == 0
