"""Loop group snapshots fail whole: the group's record is its commit point,
written after its members; a failure at any step, and a crash seen at the
next start, leave no group, no member and no copy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from csi.backend.loop.backend import LoopBackend
from csi.backend.loop.store import Store, snapshot_to_json
from csi.errors import NotFound, ResourceExhausted
from csi.model import AccessType, Snapshot, VolumeSpec, ids
from tests.support.fakes import FakeRunner

MiB = 1024 * 1024


class Copier:
    """Answers ``cp`` by making the destination file; the ``fail_at``-th copy fails with ENOSPC."""

    def __init__(self, fail_at: int = 0) -> None:
        self.fail_at = fail_at
        self.copies = 0

    def __call__(self, args: tuple[str, ...]) -> tuple[int, bytes, bytes]:
        if args[0] != "cp":
            return 0, b"", b""
        self.copies += 1
        if self.copies == self.fail_at:
            Path(args[-1]).write_bytes(b"half a copy")  # what cp leaves when the pool fills up
            return 1, b"", b"cp: error writing: No space left on device"
        Path(args[-1]).write_bytes(Path(args[-2]).read_bytes())
        return 0, b"", b""


async def make(tmp_path: Path, copier: Copier) -> tuple[LoopBackend, list[str]]:
    sysfs = tmp_path / "sys-block"
    sysfs.mkdir(exist_ok=True)
    b = LoopBackend(str(tmp_path / "pool"), FakeRunner(handler=copier), sys_block=str(sysfs))
    await b.start()
    vids = []
    for name in ("a", "b"):
        v = await b.create_volume(VolumeSpec(name=name, size=4 * MiB, access=AccessType.MOUNT, fs_type="ext4"))
        Path(b.store.volume_image(ids.parse(v.id, "v"))).write_bytes(b"data of " + name.encode())  # type: ignore[arg-type]
        vids.append(v.id)
    return b, vids


def left(b: LoopBackend) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(os.path.join(b.store.root, d))) for d in ("snapshots", "groups")}


async def assert_nothing(b: LoopBackend, name: str) -> None:
    assert b.store.group_named(name) is None
    assert await b.list_snapshots() == []
    assert left(b) == {"snapshots": [], "groups": []}


async def test_a_copy_failing_mid_way_leaves_nothing_and_a_retry_works(tmp_path: Path) -> None:
    copier = Copier(fail_at=2)
    b, vids = await make(tmp_path, copier)
    with pytest.raises(ResourceExhausted):
        await b.create_group_snapshot("g", vids)
    assert copier.copies == 2
    await assert_nothing(b, "g")
    g = await b.create_group_snapshot("g", vids)
    assert sorted(s.source_volume_id for s in g.snapshots) == sorted(vids)
    assert await b.get_group_snapshot(g.id) == g
    await b.delete_group_snapshot(g.id)
    await assert_nothing(b, "g")


async def test_no_room_leaves_nothing(tmp_path: Path) -> None:
    b, vids = await make(tmp_path, Copier())
    b._ratio = 0.0  # nothing can be promised
    with pytest.raises(ResourceExhausted):
        await b.create_group_snapshot("g", vids)
    await assert_nothing(b, "g")
    b._ratio = 1.0
    g = await b.create_group_snapshot("g", vids)
    assert len(g.snapshots) == 2


async def test_a_missing_member_leaves_nothing(tmp_path: Path) -> None:
    b, vids = await make(tmp_path, Copier())
    for other in (str(ids.new("v", "loop", "gone")), str(ids.new("v", "thick", "a"))):
        with pytest.raises(NotFound):
            await b.create_group_snapshot("g", [vids[0], other])
        await assert_nothing(b, "g")


async def test_a_commit_failing_removes_the_members_already_committed(tmp_path: Path) -> None:
    b, vids = await make(tmp_path, Copier())
    real = b.store.put_snapshot
    calls = 0

    async def put_then_fail(s: Snapshot) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("disk gone")
        await real(s)

    b.store.put_snapshot = put_then_fail  # type: ignore[method-assign]
    with pytest.raises(OSError):
        await b.create_group_snapshot("g", vids)
    await assert_nothing(b, "g")


async def test_members_are_invisible_until_the_record_is_written(tmp_path: Path) -> None:
    b, vids = await make(tmp_path, Copier())
    seen: list[int] = []
    real = b.store.put_group

    async def look_then_put(gid: ids.ObjectId, record: dict[str, object]) -> None:
        seen.append(len(await b.list_snapshots()))
        await real(gid, record)

    b.store.put_group = look_then_put  # type: ignore[method-assign]
    g = await b.create_group_snapshot("g", vids)
    assert seen == [0] and len(await b.list_snapshots()) == 2
    assert await b.get_snapshot(g.snapshots[0].id) == g.snapshots[0]


async def test_startup_removes_what_a_crash_left(tmp_path: Path) -> None:
    """Members whose group has no record (a create killed before its commit,
    a delete killed after it); a record whose members are missing (written
    first by an older ELV that then died)."""
    b, vids = await make(tmp_path, Copier())
    good = await b.create_group_snapshot("good", vids)
    half = await b.create_group_snapshot("half-deleted", vids)
    await b.store.drop_group(ids.parse(half.id, "g"))  # type: ignore[arg-type]
    unfinished = await b.create_group_snapshot("old-style", vids)
    lost = unfinished.snapshots[0]
    os.unlink(b.store.snapshot_meta(ids.parse(lost.id, "s")))  # type: ignore[arg-type]
    single = await b.create_snapshot("single", vids[0])

    s = Store(b.store.root)
    removed = s.open()
    assert sorted(s.groups) == [good.id]
    assert sorted(s.snapshots) == sorted([single.id, *(m.id for m in good.snapshots)])
    # The lost member's image, the old-style record and its other member, half-deleted's two members.
    assert len(removed) == 1 + 2 + 2
    on_disk = sorted(os.listdir(os.path.join(s.root, "snapshots")))
    assert on_disk == sorted(f"{i}.{ext}" for i in s.snapshots for ext in ("img", "json"))


def test_a_complete_group_from_an_older_elv_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    Store(str(root)).open()
    src = str(ids.new("v", "loop", "a"))
    gid = str(ids.new("g", "loop", "g"))
    sn = Snapshot(
        id=str(ids.new("s", "loop", "m")), name="m", source_volume_id=src, size=MiB, created_ns=1, group_id=gid
    )
    (root / "snapshots" / f"{sn.id}.json").write_text(json.dumps(snapshot_to_json(sn)))
    (root / "snapshots" / f"{sn.id}.img").write_bytes(b"")
    (root / "groups" / f"{gid}.json").write_text(json.dumps({"id": gid, "snapshots": [sn.id]}))
    s = Store(str(root))
    assert s.open() == []
    assert list(s.groups) == [gid] and list(s.snapshots) == [sn.id]
