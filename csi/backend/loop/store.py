"""The loop pool on disk, and the in-memory index of it.

Layout under ``--loop-dir``::

    elv-pool.json          pool marker (format version)
    volumes/<id>.img       a volume's backing file
    volumes/<id>.json      its metadata
    volumes/<id>.formatting.<fs>, volumes/<id>.formatted.<fs>
                           format markers (see mark_format)
    snapshots/<id>.img     a snapshot's (read-only) copy
    snapshots/<id>.json
    groups/<id>.json       a volume group snapshot: the member snapshot IDs; written after
                           its members and removed before them (the group's commit point)
    tmp/                   files being built; emptied at startup

**The metadata file is the commit point.** A volume exists exactly when its
``.json`` exists. Create builds and fsyncs the image, then writes the
metadata atomically (tmp file, fsync, rename, fsync of the directory, which
also makes the image's own directory entry durable). Delete removes the
metadata durably first. So after a crash an image without metadata is always
garbage from an unfinished create or delete, and startup removes it; nothing
half-made is ever taken for a volume, and three fsyncs per create suffice.

File names are built only from parsed IDs (``[a-z0-9-]``), never from request
text. The index is loaded once at startup; this process is the only writer,
so it stays exact, and each change updates disk first and memory second.

**Names.** A new object gets a fresh ID (csi.model.ids.new), so the CSI name
is found through an index of name -> ID, rebuilt at startup from the
metadata files (each holds its name) and kept with every change. Pools made
when IDs were hashes of names load the same way: their IDs stay as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

from csi.backend.base import split_parameters, stored_parameters
from csi.errors import CorruptState
from csi.model import AccessType, Snapshot, Source, Volume, ids

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "elv-pool.json"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str, obj: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``obj`` so a reader (or a crash) sees old or new, never half."""
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def remove_durably(path: str) -> bool:
    """Unlink and fsync the directory. False if it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(os.path.dirname(path))
    return True


FS_NAMES = ("ext4", "xfs")
_MARKER = re.compile(
    r"\A(?P<id>v-[a-z][a-z0-9]{0,15}-[0-9a-f]{32})\.(?P<state>formatting|formatted)\.(?P<fs>ext4|xfs)\Z"
)


def _create_durably(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)
    fsync_dir(os.path.dirname(path))


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def volume_to_json(v: Volume) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "id": v.id,
        "name": v.name,
        "size": v.size,
        "access": v.access.value,
        "fs_type": v.fs_type,
        "thick": v.thick,
        "source": None if v.source is None else {"kind": v.source.kind, "id": v.source.id},
        # One map, mutable parameters marked by their prefix: the format
        # every pool on disk has (see csi.backend.base.stored_parameters).
        "parameters": stored_parameters(v.parameters, v.mutable),
        "created_ns": v.created_ns,
        "formatted": v.formatted,
        "formatting": v.formatting,
        "attachments": dict(v.attachments),
        "block_size": v.block_size,
    }


def volume_from_json(d: Mapping[str, Any]) -> Volume:
    src = d.get("source")
    parameters, mutable = split_parameters({str(k): str(v) for k, v in (d.get("parameters") or {}).items()})
    return Volume(
        id=str(d["id"]),
        name=str(d["name"]),
        size=int(d["size"]),
        access=AccessType(d["access"]),
        fs_type=d.get("fs_type"),
        thick=bool(d.get("thick", False)),
        source=None if not src else Source(src["kind"], str(src["id"])),
        parameters=parameters,
        created_ns=int(d["created_ns"]),
        formatted=d.get("formatted"),
        formatting=d.get("formatting"),
        attachments={str(k): bool(x) for k, x in (d.get("attachments") or {}).items()},
        block_size=d.get("block_size"),
        mutable=mutable,
    )


def snapshot_to_json(s: Snapshot) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "id": s.id,
        "name": s.name,
        "source_volume_id": s.source_volume_id,
        "size": s.size,
        "created_ns": s.created_ns,
        "group_id": s.group_id,
        "access": s.access.value,
        "fs_type": s.fs_type,
        "block_size": s.block_size,
    }


def snapshot_from_json(d: Mapping[str, Any]) -> Snapshot:
    return Snapshot(
        id=str(d["id"]),
        name=str(d["name"]),
        source_volume_id=str(d["source_volume_id"]),
        size=int(d["size"]),
        created_ns=int(d["created_ns"]),
        ready=True,
        group_id=d.get("group_id"),
        access=AccessType(d.get("access", "mount")),
        fs_type=d.get("fs_type"),
        block_size=d.get("block_size"),
    )


class Store:
    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.volumes_dir = os.path.join(self.root, "volumes")
        self.snapshots_dir = os.path.join(self.root, "snapshots")
        self.groups_dir = os.path.join(self.root, "groups")
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.volumes: dict[str, Volume] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.provisioned = 0  # sum of volume sizes, kept exact incrementally
        # CSI name -> ID, one index per kind (names of different kinds may repeat).
        self._names: dict[ids.Kind, dict[str, str]] = {"v": {}, "s": {}, "g": {}}

    # -- paths (from parsed IDs only) ----------------------------------------

    def volume_image(self, vid: ids.ObjectId) -> str:
        return os.path.join(self.volumes_dir, f"{vid}.img")

    def volume_meta(self, vid: ids.ObjectId) -> str:
        return os.path.join(self.volumes_dir, f"{vid}.json")

    def snapshot_image(self, sid: ids.ObjectId) -> str:
        return os.path.join(self.snapshots_dir, f"{sid}.img")

    def snapshot_meta(self, sid: ids.ObjectId) -> str:
        return os.path.join(self.snapshots_dir, f"{sid}.json")

    def group_meta(self, gid: ids.ObjectId) -> str:
        return os.path.join(self.groups_dir, f"{gid}.json")

    # -- names ------------------------------------------------------------------

    def volume_named(self, name: str) -> Volume | None:
        vid = self._names["v"].get(name)
        return self.volumes.get(vid) if vid else None

    def snapshot_named(self, name: str) -> Snapshot | None:
        sid = self._names["s"].get(name)
        return self.snapshots.get(sid) if sid else None

    def group_named(self, name: str) -> dict[str, Any] | None:
        gid = self._names["g"].get(name)
        return self.groups.get(gid) if gid else None

    def fresh(self, kind: ids.Kind, pool: str, name: str) -> ids.ObjectId:
        """A new ID for a new object called ``name``; never one in use here
        (a repeat of 64 random bits is not expected, but costs only a retry)."""
        records: dict[ids.Kind, Mapping[str, object]] = {"v": self.volumes, "s": self.snapshots, "g": self.groups}
        paths = {
            "v": (self.volume_meta, self.volume_image),
            "s": (self.snapshot_meta, self.snapshot_image),
            "g": (self.group_meta, self.group_meta),
        }[kind]
        while True:
            oid = ids.new(kind, pool, name)
            if str(oid) not in records[kind] and not any(os.path.exists(p(oid)) for p in paths):
                return oid

    def _name(self, kind: ids.Kind, name: str, oid: str) -> None:
        # The first holder keeps a name: a create looks the name up before it
        # makes anything, so a second holder could only be a bug, never a retry.
        held = self._names[kind].setdefault(name, oid)
        if held != oid:
            log.warning("%s and %s both claim the name %r; %s keeps it", held, oid, name, held)

    def _unname(self, kind: ids.Kind, name: str | None, oid: str) -> None:
        if name is not None and self._names[kind].get(name) == oid:
            del self._names[kind][name]

    def _index_names(self) -> None:
        """Rebuild name -> ID from the loaded records, the oldest first."""
        self._names = {"v": {}, "s": {}, "g": {}}
        for v in sorted(self.volumes.values(), key=lambda x: (x.created_ns, x.id)):
            self._name("v", v.name, v.id)
        for sn in sorted(self.snapshots.values(), key=lambda x: (x.created_ns, x.id)):
            self._name("s", sn.name, sn.id)
        for gid, g in sorted(self.groups.items(), key=lambda kv: (int(kv[1].get("created_ns", 0)), kv[0])):
            self._name("g", str(g.get("name", "")), gid)

    # -- startup ----------------------------------------------------------------

    def open(self) -> list[str]:
        """Create the layout if needed, load the index, and clean up after a
        crash. Returns a description of each thing it removed."""
        for d in (self.root, self.volumes_dir, self.snapshots_dir, self.groups_dir, self.tmp_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        marker = os.path.join(self.root, MARKER)
        if os.path.exists(marker):
            with open(marker, encoding="utf-8") as f:
                fmt = json.load(f).get("format")
            if fmt != FORMAT_VERSION:
                raise CorruptState(f"pool {self.root} has format {fmt}, this driver reads {FORMAT_VERSION}")
        else:
            atomic_write_json(marker, {"format": FORMAT_VERSION})
        removed: list[str] = []
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(f"tmp/{name}")
        self.volumes = self._load(self.volumes_dir, "v", volume_from_json, removed)
        self.snapshots = self._load(self.snapshots_dir, "s", snapshot_from_json, removed)
        self.groups = {}
        for gid, path in self._metas(self.groups_dir, "g", removed):
            with open(path, encoding="utf-8") as f:
                self.groups[gid] = json.load(f)
        self._sweep_groups(removed)
        self.provisioned = sum(v.size for v in self.volumes.values())
        self._index_names()
        if removed:
            fsync_dir(self.tmp_dir)
        return removed

    def _sweep_groups(self, removed: list[str]) -> None:
        """Remove what an unfinished group create or delete left.

        A group's record is written after all its members and removed before
        them, so a member whose group has no record is the rest of a create
        or delete that did not finish. A record whose members are not all
        there was written first by an older ELV, which then died before its
        members were done: the group never existed. Both go, entirely."""
        for gid, record in sorted(self.groups.items()):
            planned = record.get("snapshots") if isinstance(record, dict) else None
            if isinstance(planned, list) and all(s in self.snapshots for s in planned):
                continue
            oid = ids.parse(gid, "g")
            assert oid is not None  # _metas yields parsed IDs only
            remove_durably(self.group_meta(oid))
            del self.groups[gid]
            removed.append(f"groups/{gid}.json (a group whose members are not all there)")
        for sid, snap in sorted(self.snapshots.items()):
            if snap.group_id is None or snap.group_id in self.groups:
                continue
            oid = ids.parse(sid, "s")
            assert oid is not None
            remove_durably(self.snapshot_meta(oid))
            _unlink_quiet(self.snapshot_image(oid))
            del self.snapshots[sid]
            removed.append(f"snapshots/{sid} (a member of group {snap.group_id}, which has no record)")

    def _metas(self, directory: str, kind: ids.Kind, removed: list[str]) -> Iterator[tuple[str, str]]:
        names = os.listdir(directory)
        metas = {n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")}
        for n in names:
            path = os.path.join(directory, n)
            if n.startswith(".") and n.endswith(".tmp"):
                os.unlink(path)  # an atomic write that never got renamed
                removed.append(os.path.relpath(path, self.root))
            elif n.endswith(".img") and n[:-4] not in metas:
                os.unlink(path)  # image of a create or delete that did not finish
                removed.append(os.path.relpath(path, self.root))
            elif _MARKER.match(n) and n.split(".")[0] not in metas:
                os.unlink(path)  # marker of a volume whose delete did not finish
                removed.append(os.path.relpath(path, self.root))
        for stem in sorted(metas):
            if ids.parse(stem, kind) is None:
                log.warning("ignoring foreign file %s in the pool", os.path.join(directory, stem + ".json"))
                continue
            yield stem, os.path.join(directory, stem + ".json")

    def _load(self, directory: str, kind: ids.Kind, conv: Any, removed: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        markers: dict[str, list[tuple[str, str]]] = {}
        for n in os.listdir(directory):
            m = _MARKER.match(n)
            if m:
                markers.setdefault(m.group("id"), []).append((m.group("state"), m.group("fs")))
        for oid, path in self._metas(directory, kind, removed):
            with open(path, encoding="utf-8") as f:
                obj = conv(json.load(f))
            if obj.id != oid:
                raise CorruptState(f"{path} describes {obj.id}")
            for state, fs in markers.get(oid, []):
                if state == "formatted":
                    obj = replace(obj, formatted=fs, formatting=None)
                elif not obj.formatted:
                    obj = replace(obj, formatting=fs)
            out[oid] = obj
        return out

    # -- format markers -------------------------------------------------------------

    def _marker(self, oid: ids.ObjectId, state: str, fs: str) -> str:
        if fs not in FS_NAMES or state not in ("formatting", "formatted"):
            raise ValueError(f"bad format marker {state}.{fs}")
        return os.path.join(self.volumes_dir, f"{oid}.{state}.{fs}")

    async def mark_format(self, oid: ids.ObjectId, fs: str, *, complete: bool) -> None:
        """Record the format intent (before mkfs) or its completion (after).

        Each is an empty marker file made durable by an fsync of the directory:
        one journal commit, where rewriting the metadata JSON costs two (and is
        measurably slower). The markers are part of the metadata: loaded with
        it, removed with it.
        """
        state = "formatted" if complete else "formatting"
        path = self._marker(oid, state, fs)
        await asyncio.to_thread(_create_durably, path)
        vol = self.volumes[str(oid)]
        self.volumes[str(oid)] = (
            replace(vol, formatted=fs, formatting=None) if complete else replace(vol, formatting=fs)
        )
        if complete:
            # The intent is moot once completion is durable; a leftover is ignored.
            await asyncio.to_thread(_unlink_quiet, self._marker(oid, "formatting", fs))

    def _drop_markers(self, oid: ids.ObjectId) -> None:
        for state in ("formatting", "formatted"):
            for fs in FS_NAMES:
                _unlink_quiet(self._marker(oid, state, fs))

    # -- changes (disk first, in a worker thread; then memory, on the loop) ----

    async def put_volume(self, v: Volume) -> None:
        oid = ids.parse(v.id, "v")
        assert oid is not None
        await asyncio.to_thread(atomic_write_json, self.volume_meta(oid), volume_to_json(v))
        old = self.volumes.get(v.id)
        self.provisioned += v.size - (old.size if old else 0)
        self.volumes[v.id] = v
        self._name("v", v.name, v.id)

    async def drop_volume(self, oid: ids.ObjectId) -> None:
        """Remove a volume: metadata first (the commit point), then the image.
        The image's unlink needs no fsync: if a crash loses it, the image has no
        metadata and startup removes it."""
        await asyncio.to_thread(remove_durably, self.volume_meta(oid))
        old = self.volumes.pop(str(oid), None)
        if old is not None:
            self.provisioned -= old.size
            self._unname("v", old.name, old.id)
        await asyncio.to_thread(_unlink_quiet, self.volume_image(oid))
        await asyncio.to_thread(self._drop_markers, oid)

    async def put_snapshot(self, s: Snapshot) -> None:
        oid = ids.parse(s.id, "s")
        assert oid is not None
        await asyncio.to_thread(atomic_write_json, self.snapshot_meta(oid), snapshot_to_json(s))
        self.snapshots[s.id] = s
        self._name("s", s.name, s.id)

    async def drop_snapshot(self, oid: ids.ObjectId) -> None:
        await asyncio.to_thread(remove_durably, self.snapshot_meta(oid))
        old = self.snapshots.pop(str(oid), None)
        if old is not None:
            self._unname("s", old.name, old.id)
        await asyncio.to_thread(_unlink_quiet, self.snapshot_image(oid))

    async def put_group(self, gid: ids.ObjectId, record: Mapping[str, Any]) -> None:
        await asyncio.to_thread(atomic_write_json, self.group_meta(gid), record)
        self.groups[str(gid)] = dict(record)
        self._name("g", str(record.get("name", "")), str(gid))

    async def drop_group(self, gid: ids.ObjectId) -> None:
        await asyncio.to_thread(remove_durably, self.group_meta(gid))
        old = self.groups.pop(str(gid), None)
        if old is not None:
            self._unname("g", str(old.get("name", "")), str(gid))
