from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from csi.backend.loop.store import (
    FORMAT_VERSION,
    MARKER,
    Store,
    atomic_write_json,
    remove_durably,
    snapshot_from_json,
    snapshot_to_json,
    volume_from_json,
    volume_to_json,
)
from csi.errors import CorruptState
from csi.model import AccessType, Snapshot, Source, Volume, ids

MiB = 1024 * 1024


def vol(name: str, size: int = 10 * MiB, **kw) -> Volume:
    fields = {
        "access": AccessType.MOUNT,
        "fs_type": "ext4",
        "thick": False,
        "source": None,
        "parameters": {},
        "created_ns": 1,
    }
    fields.update(kw)
    return Volume(id=str(ids.legacy("v", "loop", name)), name=name, size=size, **fields)


def snap(name: str, source: Volume) -> Snapshot:
    return Snapshot(
        id=str(ids.legacy("s", "loop", name)), name=name, source_volume_id=source.id, size=source.size, created_ns=2
    )


def write_volume(root: Path, v: Volume, image: bool = True) -> None:
    d = root / "volumes"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{v.id}.json").write_text(json.dumps(volume_to_json(v)))
    if image:
        (d / f"{v.id}.img").write_bytes(b"")


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


# -- atomic writes ---------------------------------------------------------------------------


def test_atomic_write_json_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    atomic_write_json(str(target), {"b": 2, "a": 1})
    assert json.loads(target.read_text()) == {"a": 1, "b": 2}
    assert target.read_text() == '{"a":1,"b":2}'
    atomic_write_json(str(target), {"a": "new"})
    assert json.loads(target.read_text()) == {"a": "new"}
    assert listing(tmp_path) == ["meta.json"]
    assert (target.stat().st_mode & 0o777) == 0o600


def test_atomic_write_json_cleans_up_when_the_rename_fails(tmp_path: Path) -> None:
    target = tmp_path / "dir-in-the-way"
    (target / "child").mkdir(parents=True)  # os.replace of a file onto a non-empty dir fails
    with pytest.raises(OSError):
        atomic_write_json(str(target), {"a": 1})
    assert listing(tmp_path) == ["dir-in-the-way"]


def test_atomic_write_json_refuses_unserialisable_data_without_leftovers(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        atomic_write_json(str(tmp_path / "x.json"), {"a": object()})
    assert listing(tmp_path) == []


def test_remove_durably(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    assert remove_durably(str(f)) is True
    assert not f.exists()
    assert remove_durably(str(f)) is False


# -- JSON round trips -------------------------------------------------------------------------


def test_volume_json_round_trip() -> None:
    v = vol(
        "pvc-1",
        access=AccessType.BLOCK,
        fs_type=None,
        thick=True,
        source=Source("snapshot", "s-loop-" + "0" * 32),
        parameters={"elv.csi.dev/provisioning": "thick"},
        formatted="xfs",
        attachments={"node-a": True},
    )
    data = json.loads(json.dumps(volume_to_json(v)))
    assert data["format"] == FORMAT_VERSION
    assert volume_from_json(data) == v


def test_mutable_parameters_keep_their_on_disk_format() -> None:
    # Pools written before mutable parameters had a field of their own keep
    # them in "parameters" under a "mutable:" prefix; that stays the format.
    v = vol("pvc-1", parameters={"elv.csi.dev/block-size": "4096"}, mutable={"elv.csi.dev/provisioning": "thick"})
    data = volume_to_json(v)
    assert data["parameters"] == {"elv.csi.dev/block-size": "4096", "mutable:elv.csi.dev/provisioning": "thick"}
    old = json.loads(json.dumps(data))
    back = volume_from_json(old)
    assert back == v
    assert back.parameters == {"elv.csi.dev/block-size": "4096"}
    assert back.mutable == {"elv.csi.dev/provisioning": "thick"}
    assert json.dumps(volume_to_json(back), sort_keys=True) == json.dumps(old, sort_keys=True)


def test_snapshot_json_round_trip() -> None:
    s = replace(snap("snap-1", vol("pvc-1")), group_id="g-loop-" + "1" * 32, access=AccessType.BLOCK, fs_type=None)
    assert snapshot_from_json(json.loads(json.dumps(snapshot_to_json(s)))) == s


# -- open() ------------------------------------------------------------------------------------


def test_open_creates_the_layout(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    s = Store(str(root))
    assert s.open() == []
    assert listing(root) == [MARKER, "groups", "snapshots", "tmp", "volumes"]
    assert json.loads((root / MARKER).read_text()) == {"format": FORMAT_VERSION}
    assert s.volumes == {}
    assert s.provisioned == 0
    # Opening again is harmless.
    assert Store(str(root)).open() == []


def test_open_cleans_up_after_a_crash_and_keeps_good_volumes(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    Store(str(root)).open()
    good, thin = vol("good", 10 * MiB), vol("thin", 3 * MiB)
    write_volume(root, good)
    write_volume(root, thin, image=False)  # metadata without image: still a volume (the node will say it is missing)
    orphan = ids.legacy("v", "loop", "orphan")
    (root / "volumes" / f"{orphan}.img").write_bytes(b"half")
    stale = root / "volumes" / f".{good.id}.json.1a2b3c4d.tmp"
    stale.write_text("{")
    (root / "volumes" / "README").write_text("foreign")
    (root / "volumes" / "notes.json").write_text("{}")  # foreign metadata-looking file
    (root / "tmp" / f"{orphan}.partial").write_bytes(b"x")
    (root / "tmp" / "freeze-1-0.frozen").write_text("{}")
    (root / "tmp" / ".hidden").write_text("")
    s_orphan = ids.legacy("s", "loop", "orphan-snap")
    (root / "snapshots" / f"{s_orphan}.img").write_bytes(b"")

    s = Store(str(root))
    removed = s.open()

    assert sorted(removed) == sorted(
        [
            f"volumes/{orphan}.img",
            f"volumes/.{good.id}.json.1a2b3c4d.tmp",
            f"tmp/{orphan}.partial",
            "tmp/freeze-1-0.frozen",
            "tmp/.hidden",
            f"snapshots/{s_orphan}.img",
        ]
    )
    assert listing(root / "tmp") == []
    assert listing(root / "volumes") == sorted(
        ["README", "notes.json", f"{good.id}.img", f"{good.id}.json", f"{thin.id}.json"]
    )
    assert listing(root / "snapshots") == []
    assert s.volumes == {good.id: good, thin.id: thin}
    assert s.provisioned == 13 * MiB


def test_open_loads_snapshots_and_groups(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    st = Store(str(root))
    st.open()
    v = vol("pvc")
    write_volume(root, v)
    sn = snap("snap", v)
    (root / "snapshots" / f"{sn.id}.json").write_text(json.dumps(snapshot_to_json(sn)))
    (root / "snapshots" / f"{sn.id}.img").write_bytes(b"")
    gid = ids.legacy("g", "loop", "grp")
    (root / "groups" / f"{gid}.json").write_text(json.dumps({"id": str(gid), "snapshots": [sn.id]}))
    s = Store(str(root))
    assert s.open() == []
    assert s.snapshots == {sn.id: sn}
    assert s.groups == {str(gid): {"id": str(gid), "snapshots": [sn.id]}}


def test_metadata_whose_id_differs_from_its_name_is_corrupt(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    Store(str(root)).open()
    a, b = vol("a"), vol("b")
    (root / "volumes" / f"{a.id}.json").write_text(json.dumps(volume_to_json(b)))
    with pytest.raises(CorruptState, match=f"describes {b.id}"):
        Store(str(root)).open()


def test_pool_marker_with_another_format_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    root.mkdir()
    (root / MARKER).write_text(json.dumps({"format": FORMAT_VERSION + 1}))
    v = vol("keep")
    write_volume(root, v)
    with pytest.raises(CorruptState, match=f"has format {FORMAT_VERSION + 1}"):
        Store(str(root)).open()
    # Nothing was touched or rewritten.
    assert json.loads((root / MARKER).read_text()) == {"format": FORMAT_VERSION + 1}
    assert listing(root / "volumes") == [f"{v.id}.img", f"{v.id}.json"]


def test_open_survives_a_directory_in_tmp(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    Store(str(root)).open()
    (root / "tmp" / "leftover-dir").mkdir()
    Store(str(root)).open()
    assert not (root / "tmp" / "leftover-dir").exists()


def test_paths_come_from_parsed_ids(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    oid = ids.legacy("v", "loop", "x")
    assert s.volume_image(oid) == os.path.join(s.volumes_dir, f"{oid}.img")
    assert s.volume_meta(oid).endswith(f"volumes/{oid}.json")
    sid = ids.legacy("s", "loop", "x")
    assert s.snapshot_meta(sid).endswith(f"snapshots/{sid}.json")


def test_root_is_resolved(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    s = Store(str(tmp_path / "link"))
    assert s.root == str(real)


# -- changes -------------------------------------------------------------------------------------


async def test_put_and_drop_keep_provisioned_exact(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    s = Store(str(root))
    s.open()
    a, b = vol("a", 10 * MiB), vol("b", 5 * MiB)
    await s.put_volume(a)
    await s.put_volume(b)
    assert s.provisioned == 15 * MiB
    await s.put_volume(replace(a, size=30 * MiB))  # grow
    assert s.provisioned == 35 * MiB
    await s.put_volume(replace(b, attachments={"node-a": False}))  # same size
    assert s.provisioned == 35 * MiB
    (root / "volumes" / f"{a.id}.img").write_bytes(b"")
    await s.drop_volume(ids.parse(a.id, "v"))  # type: ignore[arg-type]
    assert s.provisioned == 5 * MiB
    assert listing(root / "volumes") == [f"{b.id}.json"]
    await s.drop_volume(ids.parse(a.id, "v"))  # type: ignore[arg-type]  # again: nothing changes
    assert s.provisioned == 5 * MiB
    # The disk agrees with memory.
    again = Store(str(root))
    again.open()
    assert again.provisioned == s.provisioned == 5 * MiB
    assert again.volumes == s.volumes
    assert not [n for n in listing(root / "volumes") if n.endswith(".tmp")]


async def test_put_and_drop_snapshots_and_groups(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "pool"))
    s.open()
    sn = snap("s1", vol("v1"))
    await s.put_snapshot(sn)
    assert s.snapshots == {sn.id: sn}
    gid = ids.legacy("g", "loop", "grp")
    await s.put_group(gid, {"id": str(gid), "snapshots": [sn.id]})
    assert str(gid) in s.groups
    await s.drop_snapshot(ids.parse(sn.id, "s"))  # type: ignore[arg-type]
    await s.drop_group(gid)
    assert s.snapshots == {}
    assert s.groups == {}
    fresh = Store(s.root)
    fresh.open()
    assert fresh.snapshots == {}
    assert fresh.groups == {}


async def test_format_markers_are_durable_metadata(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    s = Store(str(root))
    s.open()
    v = vol("fmt")
    oid = ids.parse(v.id, "v")
    assert oid is not None
    await s.put_volume(v)
    await s.mark_format(oid, "xfs", complete=False)
    assert s.volumes[v.id].formatting == "xfs"
    # A restart (crash) between intent and completion sees the intent.
    again = Store(str(root))
    again.open()
    assert (again.volumes[v.id].formatting, again.volumes[v.id].formatted) == ("xfs", None)
    await s.mark_format(oid, "xfs", complete=True)
    assert listing(root / "volumes") == sorted([f"{v.id}.formatted.xfs", f"{v.id}.json"])
    again = Store(str(root))
    again.open()
    assert (again.volumes[v.id].formatting, again.volumes[v.id].formatted) == (None, "xfs")
    # Deleting the volume removes its markers; a marker without metadata is garbage.
    await s.drop_volume(oid)
    assert listing(root / "volumes") == []
    (root / "volumes" / f"{v.id}.formatted.ext4").touch()
    removed = Store(str(root)).open()
    assert removed == [f"volumes/{v.id}.formatted.ext4"]


async def test_format_markers_only_name_known_filesystems(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "pool"))
    s.open()
    v = vol("fmt2")
    await s.put_volume(v)
    oid = ids.parse(v.id, "v")
    assert oid is not None
    with pytest.raises(ValueError, match="bad format marker"):
        await s.mark_format(oid, "../../etc", complete=True)


# -- names ------------------------------------------------------------------------------------


def test_open_rebuilds_the_name_index_from_the_metadata(tmp_path: Path) -> None:
    # A pool made when IDs were hashes of names (ids.legacy) next to one made
    # since (ids.new): both are found by name, under the IDs they have.
    root = tmp_path / "pool"
    Store(str(root)).open()
    old = vol("old")
    new = replace(vol("new"), id=str(ids.new("v", "loop", "new")))
    write_volume(root, old)
    write_volume(root, new)
    sn = replace(snap("nightly", new), id=str(ids.new("s", "loop", "nightly")))
    (root / "snapshots" / f"{sn.id}.json").write_text(json.dumps(snapshot_to_json(sn)))
    (root / "snapshots" / f"{sn.id}.img").write_bytes(b"")
    gid = ids.new("g", "loop", "grp")
    (root / "groups" / f"{gid}.json").write_text(json.dumps({"id": str(gid), "name": "grp", "snapshots": []}))
    s = Store(str(root))
    assert s.open() == []
    assert s.volume_named("old") == old and s.volume_named("new") == new
    assert s.snapshot_named("nightly") == sn
    assert s.group_named("grp") == {"id": str(gid), "name": "grp", "snapshots": []}
    assert s.volume_named("nightly") is None, "each kind has names of its own"
    assert s.snapshot_named("old") is None and s.group_named("new") is None


async def test_the_name_index_follows_every_change(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "pool"))
    s.open()
    first = replace(vol("data"), id=str(s.fresh("v", "loop", "data")))
    await s.put_volume(first)
    assert s.volume_named("data") == first
    await s.drop_volume(ids.parse(first.id, "v"))  # type: ignore[arg-type]
    assert s.volume_named("data") is None
    second = replace(vol("data"), id=str(s.fresh("v", "loop", "data")))
    assert second.id != first.id, "a name made again gets a new ID"
    await s.put_volume(second)
    assert s.volume_named("data") == second
    sn = replace(snap("s1", second), id=str(s.fresh("s", "loop", "s1")))
    await s.put_snapshot(sn)
    assert s.snapshot_named("s1") == sn
    await s.drop_snapshot(ids.parse(sn.id, "s"))  # type: ignore[arg-type]
    assert s.snapshot_named("s1") is None
    gid = s.fresh("g", "loop", "g1")
    await s.put_group(gid, {"id": str(gid), "name": "g1", "snapshots": []})
    assert s.group_named("g1") is not None
    await s.drop_group(gid)
    assert s.group_named("g1") is None
    # Reloaded from disk, the index says the same.
    again = Store(s.root)
    again.open()
    assert again.volume_named("data") == second and again.snapshot_named("s1") is None


def test_fresh_never_returns_an_id_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(str(tmp_path / "pool"))
    s.open()
    taken = ids.legacy("v", "loop", "x")
    write_volume(Path(s.root), vol("x"), image=True)
    s.open()
    offered = [taken, taken, ids.ObjectId("v", "loop", "f" * 32)]
    monkeypatch.setattr(ids, "new", lambda *a: offered.pop(0))
    assert s.fresh("v", "loop", "x") == ids.ObjectId("v", "loop", "f" * 32)
    # An image without metadata (a create that did not finish) is in use too.
    (Path(s.volumes_dir) / f"v-loop-{'e' * 32}.img").write_bytes(b"")
    offered[:] = [ids.ObjectId("v", "loop", "e" * 32), ids.ObjectId("v", "loop", "d" * 32)]
    assert s.fresh("v", "loop", "y") == ids.ObjectId("v", "loop", "d" * 32)


def test_a_name_two_records_claim_stays_with_the_older(tmp_path: Path) -> None:
    # Never made by the driver (a create looks the name up first); if a pool
    # has it anyway, the older volume keeps the name, and both stay listed.
    root = tmp_path / "pool"
    Store(str(root)).open()
    older = replace(vol("dup"), id=str(ids.new("v", "loop", "dup")), created_ns=1)
    newer = replace(vol("dup"), id=str(ids.new("v", "loop", "dup")), created_ns=2)
    write_volume(root, newer)
    write_volume(root, older)
    s = Store(str(root))
    s.open()
    assert s.volume_named("dup") == older
    assert set(s.volumes) == {older.id, newer.id}
