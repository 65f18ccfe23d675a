"""LVM's machine output, parsed by pure functions (tested on captured JSON).

Every report is asked for with ``--reportformat json --units b --nosuffix``,
so sizes arrive as decimal byte strings and nothing depends on the locale.
Failures are classified here and nowhere else: LVM exits 5 for most errors,
so the exit status alone never says "not found"; the message must too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from csi.errors import AlreadyExists, CommandError, CorruptState, FailedPrecondition, ResourceExhausted

#: Columns ELV reads from ``lvs``; the parser below expects exactly these.
LV_FIELDS = (
    "lv_name,vg_name,lv_uuid,lv_size,lv_attr,lv_tags,pool_lv,origin,data_percent,metadata_percent,"
    "lv_device_open,lv_kernel_major,lv_kernel_minor,segtype,zero,lv_health_status,copy_percent,"
    "lv_metadata_size,chunk_size,vg_free,vg_size,vg_extent_size,lv_when_full"
)
VG_FIELDS = "vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,vg_extent_count,vg_free_count,pv_count,lv_count,vg_tags"
REPORT_ARGS = ("--reportformat", "json", "--units", "b", "--nosuffix")

_NAME = re.compile(r"\A[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}\Z")
#: Characters LVM allows in a tag (lvm(8)); ELV hex-encodes anything else.
_TAG = re.compile(r"\A[A-Za-z0-9_+.\-/=!:#&]{1,1024}\Z")


def valid_name(name: str) -> bool:
    """A VG or LV name LVM accepts and that cannot be read as an option."""
    return bool(_NAME.match(name)) and name not in (".", "..", "snapshot", "pvmove")


def valid_tag(tag: str) -> bool:
    return bool(_TAG.match(tag)) and not tag.startswith("-")


def hex_encode(text: str) -> str:
    """Request text (names, node IDs) goes into tags only hex-encoded."""
    return text.encode("utf-8", "surrogatepass").hex()


def hex_decode(value: str) -> str | None:
    try:
        return bytes.fromhex(value).decode("utf-8", "surrogatepass")
    except ValueError:
        return None


@dataclass(frozen=True)
class LvInfo:
    name: str
    vg: str
    uuid: str
    size: int
    attr: str
    tags: tuple[str, ...]
    pool: str
    origin: str
    data_percent: float | None
    metadata_percent: float | None
    open: bool
    major: int | None
    minor: int | None
    segtype: str
    zero: bool | None
    health: str
    copy_percent: float | None
    chunk_size: int
    vg_free: int | None = None
    vg_size: int | None = None
    vg_extent_size: int | None = None
    #: A thin pool's ``--errorwhenfull``: "error" (ENOSPC at once) or "queue" (writes wait first).
    when_full: str = ""
    tag_map: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def volume_type(self) -> str:
        """lv_attr's first character: V thin, t thin pool, s/S snapshot, o origin, r/R raid, - plain."""
        return self.attr[0] if self.attr else "?"

    @property
    def active(self) -> bool:
        return len(self.attr) > 4 and self.attr[4] == "a"

    @property
    def thin(self) -> bool:
        return self.segtype == "thin"

    @property
    def cow_snapshot(self) -> bool:
        """A classic (thick) copy-on-write snapshot."""
        return self.volume_type in ("s", "S")

    @property
    def is_origin(self) -> bool:
        """A thick LV that still has copy-on-write snapshots."""
        return self.volume_type in ("o", "O")

    @property
    def thin_pool(self) -> bool:
        return self.segtype == "thin-pool"

    @property
    def hidden(self) -> bool:
        return self.name.startswith("[")

    def with_tags(self, add: Iterable[str], remove: Iterable[str]) -> LvInfo:
        drop = set(remove)
        tags = tuple(sorted({t for t in self.tags if t not in drop} | set(add)))
        return replace(self, tags=tags, tag_map=tag_map(tags))

    def tag(self, key: str) -> str | None:
        return self.tag_map.get(key)

    def has(self, key: str) -> bool:
        return key in self.tag_map


@dataclass(frozen=True)
class VgInfo:
    name: str
    uuid: str
    size: int
    free: int
    extent_size: int
    extent_count: int
    free_count: int
    pv_count: int
    lv_count: int
    tags: tuple[str, ...]


def _rows(text: str, kind: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(text)
        rows: list[dict[str, Any]] = []
        for report in doc["report"]:
            rows.extend(report.get(kind, []))
        return rows
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptState(f"cannot parse the LVM {kind} report: {e}") from e


def _int(value: str, default: int | None = None) -> int | None:
    value = value.strip()
    if value in ("", "-1", "unknown"):
        return default
    return int(value)


def _float(value: str) -> float | None:
    value = value.strip()
    return float(value) if value else None


def _binary(value: str | None, name: str) -> bool | None:
    """A binary field such as ``zero``: LVM prints the field's name when it is
    set, "" when it is not (a thin pool made with ``-Z n`` reads ``zero=""``),
    and "unknown" where it does not apply (a linear LV)."""
    if value is None:
        return None  # not asked for
    value = value.strip()
    if value == name:
        return True
    return False if value == "" else None


def split_tags(value: str) -> tuple[str, ...]:
    return tuple(t for t in value.split(",") if t)


def tag_map(tags: Iterable[str]) -> dict[str, str]:
    """``key=value`` tags as a map (a bare tag maps to ""). For repeated keys
    the last wins; multi-valued keys (attachments) are read from ``tags``."""
    out: dict[str, str] = {}
    for t in tags:
        k, _, v = t.partition("=")
        out[k] = v
    return out


def parse_lvs(text: str) -> list[LvInfo]:
    out = []
    for r in _rows(text, "lv"):
        tags = split_tags(r.get("lv_tags", ""))
        out.append(
            LvInfo(
                name=r["lv_name"],
                vg=r["vg_name"],
                uuid=r.get("lv_uuid", ""),
                size=int(r["lv_size"]),
                attr=r.get("lv_attr", ""),
                tags=tags,
                pool=r.get("pool_lv", ""),
                origin=r.get("origin", ""),
                data_percent=_float(r.get("data_percent", "")),
                metadata_percent=_float(r.get("metadata_percent", "")),
                open=r.get("lv_device_open", "") == "open",
                major=_int(r.get("lv_kernel_major", "")),
                minor=_int(r.get("lv_kernel_minor", "")),
                segtype=r.get("segtype", ""),
                zero=_binary(r.get("zero"), "zero"),
                health=r.get("lv_health_status", ""),
                copy_percent=_float(r.get("copy_percent", "")),
                chunk_size=_int(r.get("chunk_size", ""), 0) or 0,
                vg_free=_int(r.get("vg_free", "")),
                vg_size=_int(r.get("vg_size", "")),
                vg_extent_size=_int(r.get("vg_extent_size", "")),
                when_full=r.get("lv_when_full", ""),
                tag_map=tag_map(tags),
            )
        )
    return out


def parse_pvs(text: str) -> list[tuple[str, str]]:
    """(PV device node, its VG's name or "") of each row of a pvs report."""
    return [(str(r.get("pv_name", "")), str(r.get("vg_name", ""))) for r in _rows(text, "pv")]


def parse_vgs(text: str) -> list[VgInfo]:
    return [
        VgInfo(
            name=r["vg_name"],
            uuid=r.get("vg_uuid", ""),
            size=int(r["vg_size"]),
            free=int(r["vg_free"]),
            extent_size=int(r["vg_extent_size"]),
            extent_count=int(r.get("vg_extent_count") or 0),
            free_count=int(r.get("vg_free_count") or 0),
            pv_count=int(r.get("pv_count") or 0),
            lv_count=int(r.get("lv_count") or 0),
            tags=split_tags(r.get("vg_tags", "")),
        )
        for r in _rows(text, "vg")
    ]


# -- failures -------------------------------------------------------------------

_NOT_FOUND = (
    re.compile(r"Volume group \"[^\"]*\" not found"),
    re.compile(r"Failed to find logical volume"),
    re.compile(r"Logical volume \S+ not found"),
    re.compile(r"origin LV \S+ not found"),
    re.compile(r"Existing logical volume \"[^\"]*\" not found"),  # lvrename
)
_NO_SPACE = (
    re.compile(r"insufficient free space", re.IGNORECASE),
    re.compile(r"Insufficient suitable allocatable extents"),
    re.compile(r"Not enough free space", re.IGNORECASE),
    re.compile(r"exceeds the size of thin pools? and the (amount|size) of free space", re.IGNORECASE),
)
_EXISTS = (re.compile(r"Logical [Vv]olume \"[^\"]*\" already exists"),)
_ORIGIN_ACTIVE = (re.compile(r"Snapshot origin volumes can be resized only while inactive"),)
#: The layout needs more PVs (stripes, mirrors) than the VG has.
_TOO_FEW_PVS = (re.compile(r"must not exceed the number of physical volumes"), re.compile(r"Insufficient suitable"))
#: lvchange -an on an LV a mount (or anything else) holds.
_OPEN = (re.compile(r"in use"), re.compile(r"open"))


def _matches(err: CommandError, patterns: tuple[re.Pattern[str], ...]) -> bool:
    text = err.stderr.decode("utf-8", "replace")
    return any(p.search(text) for p in patterns)


def not_found(err: CommandError) -> bool:
    """The VG or LV named in the command does not exist (exit 5 plus the message)."""
    return err.returncode == 5 and _matches(err, _NOT_FOUND)


def no_space(err: CommandError) -> bool:
    return err.returncode == 5 and _matches(err, _NO_SPACE)


def already_exists(err: CommandError) -> bool:
    return err.returncode == 5 and _matches(err, _EXISTS)


def origin_must_be_inactive(err: CommandError) -> bool:
    return _matches(err, _ORIGIN_ACTIVE)


def too_few_pvs(err: CommandError) -> bool:
    return _matches(err, _TOO_FEW_PVS)


def still_open(err: CommandError) -> bool:
    """A deactivation refused because the LV is open."""
    return _matches(err, _OPEN)


def missing_vgs(err: CommandError, asked: Iterable[str], reported: set[str]) -> set[str]:
    """The VGs of a report that exited 5 because they do not exist (the report
    still holds the rest, so one missing VG never hides the others)."""
    text = err.stderr.decode("utf-8", "replace")
    return {vg for vg in asked if vg not in reported and f'"{vg}" not found' in text}


def classify(err: CommandError, what: str) -> Exception:
    """LVM failures a caller can act on, as the driver's errors; others stay Internal."""
    if already_exists(err):
        # The report just said the name was free: someone else made it since.
        return AlreadyExists(f"{what}: an LV of that name appeared meanwhile; refusing to touch it")
    if no_space(err):
        return ResourceExhausted(f"not enough space for {what}: {err.message}")
    if too_few_pvs(err):
        return ResourceExhausted(f"this node's volume group cannot hold {what}: {err.message}")
    if origin_must_be_inactive(err):
        return FailedPrecondition(
            f"{what}: the volume has thick snapshots, and LVM grows a snapshot origin only while it is "
            "not staged; unstage it or delete its snapshots"
        )
    return err
