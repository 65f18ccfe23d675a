"""Volume, snapshot and group-snapshot IDs.

An ID is ``<kind>-<pool>-<32 hex>``: kind ``v``, ``s`` or ``g``; pool the
backend's pool or device class; then 64 bits of SHA-256 of the CSI name
followed by 64 random bits (:func:`new`).

**An ID names one object for ever.** Deleting a volume and creating another
of the same name gives the new one a new ID, so a CO (or a snapshot's
``source_volume_id``) that still holds the old ID can never be taken for the
new volume: a delete of the old ID finds nothing, a ListSnapshots of the new
one lists none of the old one's snapshots. Random bits need no state that
outlives the object (no counter, no tombstones); 64 of them make a repeat
among the IDs one name ever gets unlikely beyond concern (about n^2 / 2^65
after n recreations), and the name half keeps IDs of different names apart.
The name half is what lets a client that only knows a name find the object in
a listing over CSI (``elv volume clone --from-snapshot NAME``:
:meth:`ObjectId.may_be_named`); the backends themselves look names up in
their own records, which keep the name.

IDs made before this scheme were all 128 bits of the name's hash
(:func:`legacy`). They have the same shape, start with the same name half,
and keep working unchanged: nothing ever recomputes an ID from a name.

IDs arrive in requests from anyone who can create a PV, so they are parsed by
one strict regular expression and only the parsed, re-formatted parts are
ever used to build a file name (CVE-2026-3864: ``../`` in a volume ID deleted
directories outside the driver's tree).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Literal

Kind = Literal["v", "s", "g"]
_ID = re.compile(r"\A(?P<kind>[vsg])-(?P<pool>[a-z][a-z0-9]{0,15})-(?P<digest>[0-9a-f]{32})\Z")
_POOL = re.compile(r"\A[a-z][a-z0-9]{0,15}\Z")
#: Hex digits of the name's hash that start every ID (the rest are random).
NAME_HEX = 16


@dataclass(frozen=True)
class ObjectId:
    kind: Kind
    pool: str
    digest: str

    def __str__(self) -> str:
        return f"{self.kind}-{self.pool}-{self.digest}"

    def may_be_named(self, name: str) -> bool:
        """Whether this ID can belong to an object called ``name`` (new and
        legacy IDs alike start with the name's hash). A hint for clients
        that see only IDs; a backend confirms a name from its own records."""
        return self.digest.startswith(name_hash(name))


def digest(name: str) -> str:
    """128 bits of SHA-256 of the name, in hex."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def name_hash(name: str) -> str:
    """The name half of an ID."""
    return digest(name)[:NAME_HEX]


def _check_pool(pool: str) -> None:
    if not _POOL.match(pool):
        raise ValueError(f"invalid pool name {pool!r}")


def new(kind: Kind, pool: str, name: str) -> ObjectId:
    """A fresh ID for a new object called ``name``: never the ID of an earlier one."""
    _check_pool(pool)
    return ObjectId(kind, pool, name_hash(name) + secrets.token_hex((32 - NAME_HEX) // 2))


def legacy(kind: Kind, pool: str, name: str) -> ObjectId:
    """The ID an object of this name got before IDs were made unique
    (all 128 bits from the name). Objects made then keep it; nothing new gets one."""
    _check_pool(pool)
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
