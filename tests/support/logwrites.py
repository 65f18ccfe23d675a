"""Read and replay a dm-log-writes log: the power-loss test's crash states.

The kernel's log-writes target (drivers/md/dm-log-writes.c, the method of
xfstests and CrashMonkey) passes writes through to a data device and appends
each one, once it is flushed, to a log device, in the order it reached stable
storage. Replaying the log's entries 0..i onto a copy of the data device's
starting state gives the disk as a power cut right after entry i would have
left it; the points worth checking are the flushes and FUA writes, and the
marks a test adds (``dmsetup message DEV 0 mark NAME``).

The log's layout, in blocks of the data device's logical block size S:
block 0 is the super (magic, version, entry count, S); each entry is one
block holding (sector, nr_sectors, flags, data_len) as little-endian u64s
(a mark's name follows in the same block), then, unless it is a discard or a
mark, nr_sectors blocks of data. Sectors count in units of S.

No package here ships xfstests' replay-log, so this is our own, small
replayer: pure code over file objects, unit-tested on a log it builds.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = 0x6A736677736872
VERSION = 1
FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
_SUPER = struct.Struct("<QQQI")
_ENTRY = struct.Struct("<QQQQ")


class LogError(ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    index: int
    sector: int  # in blocks of the log's sectorsize
    nr_sectors: int
    flags: int
    data_offset: int  # byte offset of its data in the log
    mark: str | None

    @property
    def durable_point(self) -> bool:
        """A flush or FUA write: what came before it is on stable storage."""
        return bool(self.flags & (FLUSH | FUA))


@dataclass(frozen=True)
class Log:
    sectorsize: int
    entries: list[Entry]

    def marks(self) -> dict[str, int]:
        """Mark name -> its entry index (the last one of a name)."""
        return {e.mark: e.index for e in self.entries if e.mark is not None}

    def points(self) -> list[int]:
        """The entry indexes after which a crash state is checked: every flush,
        FUA write and mark."""
        return [e.index for e in self.entries if e.durable_point or e.mark is not None]


def read_log(f: BinaryIO) -> Log:
    f.seek(0)
    head = f.read(_SUPER.size)
    if len(head) < _SUPER.size:
        raise LogError("the log is shorter than its super block")
    magic, version, count, sectorsize = _SUPER.unpack(head)
    if magic != MAGIC or version != VERSION:
        raise LogError(f"not a dm-log-writes log (magic {magic:#x}, version {version})")
    if sectorsize < 512 or sectorsize & (sectorsize - 1):
        raise LogError(f"bad sector size {sectorsize}")
    entries = []
    pos = sectorsize
    for i in range(count):
        f.seek(pos)
        block = f.read(sectorsize)
        if len(block) < sectorsize:
            raise LogError(f"entry {i} of {count} is cut short")
        sector, nr, flags, data_len = _ENTRY.unpack_from(block)
        mark = None
        if flags & MARK:
            mark = block[_ENTRY.size : _ENTRY.size + data_len].decode("utf-8", "replace")
        entries.append(Entry(i, sector, nr, flags, pos + sectorsize, mark))
        pos += sectorsize
        if not flags & (DISCARD | MARK):
            pos += nr * sectorsize
    return Log(sectorsize, entries)


class Replayer:
    """Applies a log's entries in order onto a target (a file or a block
    device opened read-write) that starts as the data device started."""

    def __init__(self, log: Log, log_file: BinaryIO, target: int) -> None:
        self.log = log
        self.f = log_file
        self.target = target  # an fd
        self.next = 0  # the index of the next entry to apply
        self._zeros = bytes(1 << 20)

    def apply_until(self, index: int) -> None:
        """Apply entries up to and including ``index``."""
        if index < self.next - 1:
            raise LogError(f"entry {index} was applied already (next is {self.next})")
        while self.next <= index:
            self._apply(self.log.entries[self.next])
            self.next += 1
        os.fsync(self.target)

    def _apply(self, e: Entry) -> None:
        ss = self.log.sectorsize
        if e.flags & MARK or e.nr_sectors == 0:
            return
        offset, length = e.sector * ss, e.nr_sectors * ss
        if e.flags & DISCARD:
            # What a discard leaves is unspecified; zeros are one thing it may.
            for chunk in _chunks(length, len(self._zeros)):
                os.pwrite(self.target, self._zeros[:chunk], offset)
                offset += chunk
            return
        self.f.seek(e.data_offset)
        for chunk in _chunks(length, 1 << 20):
            data = self.f.read(chunk)
            if len(data) != chunk:
                raise LogError(f"entry {e.index}'s data is cut short")
            os.pwrite(self.target, data, offset)
            offset += chunk


def _chunks(total: int, size: int) -> Iterator[int]:
    while total > 0:
        n = min(total, size)
        yield n
        total -= n


def build_log(sectorsize: int, records: list[tuple[int, int, int, bytes | str]]) -> bytes:
    """A log as the kernel writes it, for unit tests: (sector, nr_sectors,
    flags, data or mark name) per entry."""
    out = bytearray(_SUPER.pack(MAGIC, VERSION, len(records), sectorsize).ljust(sectorsize, b"\0"))
    for sector, nr, flags, payload in records:
        if flags & MARK:
            name = payload.encode() if isinstance(payload, str) else payload
            out += (_ENTRY.pack(sector, nr, flags, len(name)) + name).ljust(sectorsize, b"\0")
            continue
        data = payload if isinstance(payload, bytes) else payload.encode()
        out += _ENTRY.pack(sector, nr, flags, 0).ljust(sectorsize, b"\0")
        if not flags & DISCARD:
            assert len(data) == nr * sectorsize
            out += data
    return bytes(out)
