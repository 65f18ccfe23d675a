"""The loop backend's controller side on a tmp pool: sparse files, no loop devices
(attachment is read from a fake sysfs), no commands."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi.backend.loop.backend import LoopBackend
from csi.errors import AlreadyExists, InUse, NotFound, ResourceExhausted
from csi.model import AccessType, VolumeSpec, ids
from tests.support.fakes import FakeRunner

MiB = 1024 * 1024


def spec(name: str = "pvc-1", size: int = 16 * MiB, **kw) -> VolumeSpec:
    kw.setdefault("access", AccessType.MOUNT)
    kw.setdefault("fs_type", "ext4")
    return VolumeSpec(name=name, size=size, **kw)


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    d = tmp_path / "sys-block"
    d.mkdir()
    return d


@pytest.fixture
async def backend(tmp_path: Path, sysfs: Path) -> LoopBackend:
    b = LoopBackend(str(tmp_path / "pool"), FakeRunner(), sys_block=str(sysfs))  # type: ignore[arg-type]
    await b.start()
    return b


def attach_in_sysfs(sysfs: Path, name: str, image: str) -> None:
    (sysfs / name / "loop").mkdir(parents=True)
    (sysfs / name / "loop" / "backing_file").write_text(image + "\n")


async def test_create_volume_makes_a_sparse_image(backend: LoopBackend) -> None:
    vol = await backend.create_volume(spec(size=64 * MiB))
    oid = ids.parse(vol.id, "v")
    assert oid is not None and oid.pool == "loop" and oid.may_be_named("pvc-1")
    image = backend.store.volume_image(ids.parse(vol.id, "v"))  # type: ignore[arg-type]
    st = os.stat(image)
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 < 64 * MiB  # sparse
    assert os.listdir(backend.store.tmp_dir) == []
    assert await backend.get_volume(vol.id) == vol
    assert backend.store.provisioned == 64 * MiB


async def test_create_volume_is_idempotent_and_checks_compatibility(backend: LoopBackend) -> None:
    first = await backend.create_volume(spec())
    assert await backend.create_volume(spec()) == first
    assert await backend.create_volume(spec(size=8 * MiB)) == first  # already big enough
    with pytest.raises(AlreadyExists, match="size"):
        await backend.create_volume(spec(size=32 * MiB))
    with pytest.raises(AlreadyExists, match="access type"):
        await backend.create_volume(spec(access=AccessType.BLOCK, fs_type=None))
    with pytest.raises(AlreadyExists, match="filesystem"):
        await backend.create_volume(spec(fs_type="xfs"))
    with pytest.raises(AlreadyExists, match="parameters"):
        await backend.create_volume(spec(parameters={"elv.csi.dev/provisioning": "thick"}))
    assert len(await backend.list_volumes()) == 1


async def test_a_repeat_whose_limit_the_volume_exceeds_is_already_exists(backend: LoopBackend) -> None:
    first = await backend.create_volume(spec(size=16 * MiB))
    # The spec: a volume of this name that is larger than limit_bytes is not compatible.
    with pytest.raises(AlreadyExists, match="limit_bytes"):
        await backend.create_volume(spec(size=8 * MiB, limit=12 * MiB))
    assert await backend.create_volume(spec(size=8 * MiB, limit=16 * MiB)) == first
    assert await backend.create_volume(spec(size=8 * MiB, limit=32 * MiB)) == first
    assert [v.id for v in await backend.list_volumes()] == [first.id]


async def test_create_volume_beyond_the_pool_is_resource_exhausted(backend: LoopBackend) -> None:
    with pytest.raises(ResourceExhausted, match="cannot promise"):
        await backend.create_volume(spec(size=1 << 60))
    assert os.listdir(backend.store.tmp_dir) == []
    assert os.listdir(backend.store.volumes_dir) == []
    assert backend.store.provisioned == 0


async def test_create_volume_from_a_missing_source_is_not_found(backend: LoopBackend) -> None:
    from csi.model import Source

    with pytest.raises(NotFound):
        await backend.create_volume(spec(source=Source("snapshot", "s-loop-" + "0" * 32)))
    with pytest.raises(NotFound):
        await backend.create_volume(spec(source=Source("volume", "../../etc/passwd")))
    assert os.listdir(backend.store.volumes_dir) == []


@pytest.mark.parametrize(
    "vid",
    ["../../etc/passwd", "v-loop-" + "0" * 31, "v-lvm-" + "0" * 32, "s-loop-" + "0" * 32, "v-loop-" + "0" * 32, ""],
)
async def test_delete_of_malformed_or_unknown_ids_is_a_no_op(backend: LoopBackend, tmp_path: Path, vid: str) -> None:
    kept = await backend.create_volume(spec("keep"))
    before = sorted(os.listdir(backend.store.volumes_dir))
    await backend.delete_volume(vid)
    assert sorted(os.listdir(backend.store.volumes_dir)) == before
    assert await backend.get_volume(kept.id) == kept


async def test_delete_volume(backend: LoopBackend) -> None:
    vol = await backend.create_volume(spec())
    await backend.delete_volume(vol.id)
    assert os.listdir(backend.store.volumes_dir) == []
    assert await backend.get_volume(vol.id) is None
    assert backend.store.provisioned == 0
    await backend.delete_volume(vol.id)


async def test_delete_of_a_staged_volume_is_in_use(backend: LoopBackend, sysfs: Path) -> None:
    vol = await backend.create_volume(spec())
    image = backend.store.volume_image(ids.parse(vol.id, "v"))  # type: ignore[arg-type]
    attach_in_sysfs(sysfs, "loop7", image)
    with pytest.raises(InUse, match="/dev/loop7"):
        await backend.delete_volume(vol.id)
    assert os.path.exists(image)
    # A device whose backing file was deleted does not pin the new one.
    (sysfs / "loop7" / "loop" / "backing_file").write_text(image + " (deleted)\n")
    await backend.delete_volume(vol.id)
    assert not os.path.exists(image)


async def test_delete_of_a_published_volume_is_in_use(backend: LoopBackend) -> None:
    vol = await backend.create_volume(spec())
    await backend.set_attachment(vol.id, "node-a", False)
    with pytest.raises(InUse, match="node-a"):
        await backend.delete_volume(vol.id)
    await backend.set_attachment(vol.id, "node-a", None)
    await backend.delete_volume(vol.id)
    assert await backend.get_volume(vol.id) is None


async def test_a_name_made_again_is_a_new_volume_with_a_new_id(backend: LoopBackend) -> None:
    old = await backend.create_volume(spec("data"))
    await backend.delete_volume(old.id)
    new = await backend.create_volume(spec("data"))
    assert new.id != old.id, "an ID must name one volume for ever"
    assert await backend.get_volume(old.id) is None
    # A CO that still holds the old ID deletes nothing of the new volume.
    await backend.delete_volume(old.id)
    assert await backend.get_volume(new.id) == new
    assert os.path.exists(backend.store.volume_image(ids.parse(new.id, "v")))  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        await backend.expand_volume(old.id, 64 * MiB)
    # While it exists, the name still finds it.
    assert await backend.create_volume(spec("data")) == new
    assert [v.id for v in await backend.list_volumes()] == [new.id]


async def test_a_volume_made_with_a_legacy_id_keeps_it(backend: LoopBackend, tmp_path: Path, sysfs: Path) -> None:
    # A pool from before IDs were unique: the ID was the hash of the name, and
    # stays so. A restart finds it by its name, and a repeat create returns it.
    made = await backend.create_volume(spec("old-pvc"))
    legacy = str(ids.legacy("v", "loop", "old-pvc"))
    vdir = backend.store.volumes_dir
    for f in os.listdir(vdir):
        os.rename(os.path.join(vdir, f), os.path.join(vdir, f.replace(made.id, legacy)))
    with open(os.path.join(vdir, legacy + ".json")) as f:
        text = f.read()
    with open(os.path.join(vdir, legacy + ".json"), "w") as f:
        f.write(text.replace(made.id, legacy))
    again = LoopBackend(str(tmp_path / "pool"), FakeRunner(), sys_block=str(sysfs))  # type: ignore[arg-type]
    await again.start()
    assert [v.id for v in await again.list_volumes()] == [legacy]
    assert (await again.create_volume(spec("old-pvc"))).id == legacy
    await again.delete_volume(legacy)
    assert os.listdir(vdir) == []


async def test_expand_volume(backend: LoopBackend) -> None:
    vol = await backend.create_volume(spec(size=16 * MiB))
    grown = await backend.expand_volume(vol.id, 48 * MiB)
    assert grown.size == 48 * MiB
    assert os.stat(backend.store.volume_image(ids.parse(vol.id, "v"))).st_size == 48 * MiB  # type: ignore[arg-type]
    assert (await backend.expand_volume(vol.id, 8 * MiB)).size == 48 * MiB
    assert backend.store.provisioned == 48 * MiB
    with pytest.raises(NotFound):
        await backend.expand_volume("v-loop-" + "1" * 32, 64 * MiB)


async def test_state_survives_a_restart(backend: LoopBackend, tmp_path: Path, sysfs: Path) -> None:
    a = await backend.create_volume(spec("a", 16 * MiB))
    await backend.create_volume(spec("b", 32 * MiB, access=AccessType.BLOCK, fs_type=None))
    await backend.mark_formatted(a.id, "ext4", complete=False)
    again = LoopBackend(str(tmp_path / "pool"), FakeRunner(), sys_block=str(sysfs))  # type: ignore[arg-type]
    await again.start()
    assert again.store.volumes == backend.store.volumes
    assert again.store.provisioned == 48 * MiB
    loaded = await again.get_volume(a.id)
    assert loaded is not None
    assert loaded.formatting == "ext4"
    assert loaded.formatted is None
    await again.mark_formatted(a.id, "ext4")
    done = await again.get_volume(a.id)
    assert done is not None
    assert (done.formatted, done.formatting) == ("ext4", None)
    # The name index is rebuilt from the metadata: a repeat create is still idempotent.
    assert (await again.create_volume(spec("a", 16 * MiB))).id == a.id
    assert len(await again.list_volumes()) == 2


async def test_health(backend: LoopBackend, sysfs: Path) -> None:
    vol = await backend.create_volume(spec())
    h = await backend.health(vol.id)
    assert h.abnormal
    assert "not attached" in h.message
    attach_in_sysfs(sysfs, "loop3", backend.store.volume_image(ids.parse(vol.id, "v")))  # type: ignore[arg-type]
    # Made outside this process: seen once indexed, as at a restart (seed).
    backend._loop.seed()
    assert not (await backend.health(vol.id)).abnormal
    assert (await backend.health("v-loop-" + "2" * 32)).abnormal


async def test_start_stops_discards_on_a_staged_thick_volume(backend: LoopBackend, tmp_path: Path, sysfs: Path) -> None:
    # A thick volume staged by a driver that let its device discard: the next
    # start turns that off at once, not only at the next stage. Thin ones keep it.
    thick = await backend.create_volume(spec("thick", parameters={"elv.csi.dev/provisioning": "thick"}, thick=True))
    thin = await backend.create_volume(spec("thin"))
    for name, vol in (("loop3", thick), ("loop4", thin)):
        attach_in_sysfs(sysfs, name, backend.store.volume_image(ids.parse(vol.id, "v")))  # type: ignore[arg-type]
        (sysfs / name / "queue").mkdir()
        (sysfs / name / "queue" / "discard_max_bytes").write_text("4294966784\n")
        (sysfs / name / "queue" / "discard_max_hw_bytes").write_text("4294966784\n")
    again = LoopBackend(str(tmp_path / "pool"), FakeRunner(), sys_block=str(sysfs))  # type: ignore[arg-type]
    await again.start()
    assert (sysfs / "loop3" / "queue" / "discard_max_bytes").read_text() == "0"
    assert (sysfs / "loop4" / "queue" / "discard_max_bytes").read_text() == "4294966784\n"


async def test_a_create_cut_before_its_metadata_leaves_no_volume(
    backend: LoopBackend, tmp_path: Path, sysfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The image is built under its final (new) name; the metadata is the commit
    # point. A crash between the two leaves an image that startup removes, and
    # the retry (same name) makes the volume afresh.
    seen: list[str] = []

    async def crash(vol: object) -> None:
        seen.extend(os.listdir(backend.store.volumes_dir))
        raise KeyboardInterrupt  # a BaseException, as a kill would cut it: no cleanup of its own

    monkeypatch.setattr(backend.store, "put_volume", crash)
    with pytest.raises(KeyboardInterrupt):
        await backend.create_volume(spec("cut"))
    assert len(seen) == 1 and seen[0].endswith(".img"), seen
    # A real kill runs no handler: put the image back as the crash left it.
    open(os.path.join(backend.store.volumes_dir, seen[0]), "wb").close()
    again = LoopBackend(str(tmp_path / "pool"), FakeRunner(), sys_block=str(sysfs))  # type: ignore[arg-type]
    await again.start()
    assert os.listdir(again.store.volumes_dir) == [] and await again.list_volumes() == []
    vol = await again.create_volume(spec("cut"))
    assert vol.id + ".img" != seen[0]
    assert sorted(os.listdir(again.store.volumes_dir)) == [vol.id + ".img", vol.id + ".json"]
