"""Volume, snapshot and group-snapshot IDs.

An ID is ``<kind>-<pool>-<32 hex>``: kind ``v``, ``s`` or ``g``; pool the
backend's pool or device class; the hex the first 128 bits of SHA-256 of the
CSI name. Deriving the ID from the name makes CreateVolume idempotent without
any index, and a retry after a crash finds the half-made object by name.

IDs arrive in requests from anyone who can create a PV, so they are parsed by
one strict regular expression and only the parsed, re-formatted parts are
ever used to build a file name (CVE-2026-3864: ``../`` in a volume ID deleted
directories outside the driver's tree).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["v", "s", "g"]
_ID = re.compile(r"\A(?P<kind>[vsg])-(?P<pool>[a-z][a-z0-9]{0,15})-(?P<digest>[0-9a-f]{32})\Z")
_POOL = re.compile(r"\A[a-z][a-z0-9]{0,15}\Z")


@dataclass(frozen=True)
class ObjectId:
    kind: Kind
    pool: str
    digest: str

    def __str__(self) -> str:
        return f"{self.kind}-{self.pool}-{self.digest}"


def digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def make(kind: Kind, pool: str, name: str) -> ObjectId:
    if not _POOL.match(pool):
        raise ValueError(f"invalid pool name {pool!r}")
    return ObjectId(kind, pool, digest(name))


def parse(value: str, kind: Kind) -> ObjectId | None:
    """The parsed ID, or None when ``value`` is not an ID of that kind.

    Callers treat None as "no such object" (NOT_FOUND, or OK for deletes),
    never as a path to look at.
    """
    m = _ID.match(value)
    if m is None or m.group("kind") != kind:
        return None
    return ObjectId(kind, m.group("pool"), m.group("digest"))
