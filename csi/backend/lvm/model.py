"""LV names and tags: how ELV's objects live in LVM metadata, and nothing else.

There is no state file. An LV is ELV's only if it carries the owner tag
(``elv.owner=<driver name>``); every other LV is left alone, whatever its
name. LV names derive from IDs, which are fresh for every new object
(csi.model.ids), so request text never reaches LVM as a name and no LV name
is ever used twice; text that must be kept (the CSI name, node IDs,
parameters) is hex-encoded into tags, and a CSI name is looked up by its
tag (LvStore.named). LVs made when IDs were hashes of names keep their names.

    elv-v-<class>-<hex>     a volume          elv.kind=v
    elv-s-<class>-<hex>     a snapshot        elv.kind=s
    elv-t-<hex>             a temporary snapshot a thick clone copies from
    elv-q-<random>          quarantined (elv.wipe)

One ``lvcreate`` with all its ``--addtag`` options is one metadata commit, so
a volume appears with its tags or not at all. Work that takes more than one
command (a clone's copy, a resize after a thin clone, the members of a group
snapshot) is marked ``elv.pending`` until it is done; startup removes what
still carries it, and every member of a group that has a pending member.

A new, empty mount volume is born with ``elv.formatting=<fs>``: nobody but
ELV has written to it, so until ``elv.formatted`` replaces it (after mkfs,
before the first mount) whatever it holds is ELV's own, exactly as after an
mkfs that began and never finished. Staging it then records the result in
one lvchange instead of two.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from csi.backend.base import split_parameters, stored_parameters
from csi.backend.lvm.report import LvInfo, hex_decode, hex_encode, tag_map
from csi.model import AccessType, Snapshot, Source, Volume, VolumeSpec, ids

OWNER = "elv.owner"
KIND = "elv.kind"
NAME = "elv.name"
SIZE = "elv.size"
ACCESS = "elv.access"
FS = "elv.fs"
FORMATTED = "elv.formatted"
FORMATTING = "elv.formatting"
SOURCE = "elv.src"
PARAMS = "elv.params"
CREATED = "elv.created"
PENDING = "elv.pending"
WIPE = "elv.wipe"
ATTACHED = "elv.att"
GROUP = "elv.group"
GROUP_NAME = "elv.gname"
GROUP_SIZE = "elv.gcount"

Kind = Literal["v", "s", "t"]


def lv_name(object_id: ids.ObjectId) -> str:
    return f"elv-{object_id}"


def temp_name(object_id: ids.ObjectId) -> str:
    return f"elv-t-{object_id.digest}"


def quarantine_name() -> str:
    return f"elv-q-{secrets.token_hex(8)}"


def parse_lv_name(name: str) -> ids.ObjectId | None:
    """The volume or snapshot ID an LV name stands for (None for other names)."""
    if not name.startswith("elv-"):
        return None
    rest = name[4:]
    return ids.parse(rest, "v") or ids.parse(rest, "s")


def owned(lv: LvInfo, owner: str) -> bool:
    return lv.tag(OWNER) == owner


def tag(key: str, value: str | int | None = None) -> str:
    return key if value is None else f"{key}={value}"


def addtags(tags: list[str]) -> list[str]:
    out: list[str] = []
    for t in tags:
        out += ["--addtag", t]
    return out


def encode_params(params: Mapping[str, str]) -> str:
    return hex_encode(json.dumps(dict(params), sort_keys=True, separators=(",", ":")))


def decode_params(value: str | None) -> dict[str, str]:
    text = hex_decode(value or "")
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def volume_tags(
    owner: str,
    spec: VolumeSpec,
    created_ns: int,
    formatted: str | None = None,
    pending: bool = False,
    formatting: str | None = None,
) -> list[str]:
    tags = [
        tag(OWNER, owner),
        tag(KIND, "v"),
        tag(NAME, hex_encode(spec.name)),
        tag(SIZE, spec.size),
        tag(ACCESS, spec.access.value),
        tag(CREATED, created_ns),
    ]
    if spec.fs_type:
        tags.append(tag(FS, spec.fs_type))
    params = stored_parameters(spec.parameters, spec.mutable)
    if params:
        tags.append(tag(PARAMS, encode_params(params)))
    if spec.source is not None:
        tags.append(tag(SOURCE, f"{spec.source.kind}:{spec.source.id}"))
    if formatted:
        tags.append(tag(FORMATTED, formatted))
    elif formatting:
        tags.append(tag(FORMATTING, formatting))
    if pending:
        tags.append(tag(PENDING))
    return tags


def snapshot_tags(
    owner: str,
    name: str,
    source: Volume,
    created_ns: int,
    group: tuple[str, str, int] | None = None,
    pending: bool = False,
) -> list[str]:
    tags = [
        tag(OWNER, owner),
        tag(KIND, "s"),
        tag(NAME, hex_encode(name)),
        tag(SOURCE, source.id),
        tag(SIZE, source.size),
        tag(ACCESS, source.access.value),
        tag(CREATED, created_ns),
    ]
    fs = source.formatted or source.fs_type
    if fs:
        tags.append(tag(FS, fs))
    if group is not None:
        gid, gname, count = group
        tags += [tag(GROUP, gid), tag(GROUP_NAME, hex_encode(gname)), tag(GROUP_SIZE, count)]
    if pending:
        tags.append(tag(PENDING))
    return tags


def unfinished_groups(lvs: Iterable[LvInfo], owner: str) -> set[str]:
    """Groups with a member still pending: a group's members are made
    pending and let go together once all exist, so such a group never
    finished, whatever its other members look like."""
    return {g for lv in lvs if owned(lv, owner) and lv.tag(KIND) == "s" and lv.has(PENDING) and (g := lv.tag(GROUP))}


def attachment_tag(node_id: str, readonly: bool) -> str:
    return tag(ATTACHED, f"{hex_encode(node_id)}.{'ro' if readonly else 'rw'}")


def node_attachment_tags(lv: LvInfo, node_id: str) -> list[str]:
    prefix = f"{ATTACHED}={hex_encode(node_id)}."
    return [t for t in lv.tags if t.startswith(prefix)]


def attachments(lv: LvInfo) -> dict[str, bool]:
    return _attachments(lv.tags)


def _attachments(tags: Iterable[str]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for t in tags:
        if t.startswith(ATTACHED + "="):
            node_hex, _, mode = t[len(ATTACHED) + 1 :].partition(".")
            node = hex_decode(node_hex)
            if node is not None:
                out[node] = mode == "ro"
    return out


def _source(value: str | None) -> Source | None:
    if not value:
        return None
    kind, _, sid = value.partition(":")
    if kind == "snapshot":
        return Source("snapshot", sid)
    if kind == "volume":
        return Source("volume", sid)
    return None


def _access(value: str | None) -> AccessType:
    return AccessType.BLOCK if value == "block" else AccessType.MOUNT


def to_volume(lv: LvInfo, volume_id: str) -> Volume:
    return volume_of(volume_id, lv.tags, lv.size, thick=not lv.thin)


def volume_of(volume_id: str, tags: Sequence[str], size: int, *, thick: bool) -> Volume:
    """The volume an LV of this size with these tags is: read from a report,
    or, for an LV this process has just made, from what it told lvcreate."""
    tm = tag_map(tags)
    parameters, mutable = split_parameters(decode_params(tm.get(PARAMS)))
    return Volume(
        id=volume_id,
        name=hex_decode(tm.get(NAME) or "") or "",
        size=size,
        access=_access(tm.get(ACCESS)),
        fs_type=tm.get(FS) or None,
        thick=thick,
        source=_source(tm.get(SOURCE)),
        parameters=parameters,
        created_ns=int(tm.get(CREATED) or 0),
        formatted=tm.get(FORMATTED) or None,
        formatting=tm.get(FORMATTING) or None,
        attachments=_attachments(tags),
        mutable=mutable,
    )


def to_snapshot(lv: LvInfo, snapshot_id: str) -> Snapshot:
    # A COW snapshot that overflowed is invalid (attr S): it can no longer be restored.
    invalid = lv.volume_type == "S" or (len(lv.attr) > 4 and lv.attr[4] == "I")
    return Snapshot(
        id=snapshot_id,
        name=hex_decode(lv.tag(NAME) or "") or "",
        source_volume_id=lv.tag(SOURCE) or "",
        size=int(lv.tag(SIZE) or lv.size),
        created_ns=int(lv.tag(CREATED) or 0),
        ready=not invalid,
        group_id=lv.tag(GROUP) or None,
        access=_access(lv.tag(ACCESS)),
        fs_type=lv.tag(FS) or None,
    )


def live(lv: LvInfo, owner: str, kind: Kind) -> bool:
    """ELV's, of this kind, finished, and not on its way out."""
    return owned(lv, owner) and lv.tag(KIND) == kind and not lv.has(PENDING) and not lv.has(WIPE)
