"""LVM group snapshots are whole or absent: members are made ``elv.pending``
and let go together; a failure removes what was made, and startup removes
every member of a group that still has a pending one. Over the in-memory LVM
(tests/support/fake_lvm.py)."""

from __future__ import annotations

from typing import Any

import pytest

from csi.backend.lvm import devnode, wipe
from csi.backend.lvm.backend import LvmBackend
from csi.backend.lvm.recovery import recover
from csi.backend.lvm.report import hex_encode
from csi.errors import NotFound, ResourceExhausted
from csi.model import DEVICE_CLASS, AccessType, Device, VolumeSpec, ids
from tests.support.fake_lvm import CONFIG, OWNER, FakeLv, FakeLvm, GiB, MiB, backend_over

NO_ROOM = b'  Volume group "vg0" has insufficient free space (1 extents): 9 required.\n'


@pytest.fixture(autouse=True)
def _no_devices(monkeypatch: pytest.MonkeyPatch, lvm: FakeLvm) -> None:
    monkeypatch.setattr(devnode, "kernel_name", lambda major, minor, *a: f"dm-{minor}")
    monkeypatch.setattr(wipe, "zero_out", lambda path, stop=None: lvm.calls.append(("zero_out", path)))
    monkeypatch.setattr(devnode, "find_dm_by_name", lambda name, *a: ("dm-99", 254, 99))
    monkeypatch.setattr(devnode, "scan_dm_by_name", lambda name, *a: (("dm-99", 254, 99), True))

    async def fake_wait(major: int, minor: int, **kw: Any) -> Device:
        return Device(f"dm-{minor}", f"/dev/dm-{minor}", major, minor)

    monkeypatch.setattr(devnode, "wait_for_device", fake_wait)


@pytest.fixture
def lvm() -> FakeLvm:
    r = FakeLvm()
    r.add(FakeLv("pool0", "vg0", 2 * GiB, "thin-pool", data_percent=0.0, metadata_percent=5.0))
    return r


async def started(lvm: FakeLvm) -> LvmBackend:
    b = backend_over(lvm, CONFIG)
    await recover(b.store, b.wiper)
    return b


def spec(name: str, cls: str) -> VolumeSpec:
    return VolumeSpec(name=name, size=64 * MiB, access=AccessType.MOUNT, fs_type="ext4", parameters={DEVICE_CLASS: cls})


def fail_nth_snapshot(b: LvmBackend, lvm: FakeLvm, n: int) -> None:
    runner = b.store.runner
    real = lvm.handle
    seen = 0

    def handle(args: tuple[str, ...]) -> tuple[int, bytes, bytes]:
        nonlocal seen
        if args[:2] == ("lvm", "lvcreate") and "-s" in args:
            seen += 1
            if seen == n:
                lvm.calls.append(args)
                return 5, b"", NO_ROOM
        return real(args)

    runner.handler = handle  # type: ignore[attr-defined]


def snapshot_lvs(lvm: FakeLvm) -> list[FakeLv]:
    return [lv for lv in lvm.lvs.values() if "elv.kind=s" in lv.tags]


async def assert_no_group(b: LvmBackend, lvm: FakeLvm, name: str) -> None:
    assert await b.list_snapshots() == []
    assert [lv.name for lv in snapshot_lvs(lvm) if "elv.wipe" not in lv.tags] == []
    await b.wiper.pass_once()
    assert snapshot_lvs(lvm) == [], "the wiper removed what the failed group made"


@pytest.mark.parametrize("cls", ["thick", "thin"])
async def test_no_room_for_the_second_member_leaves_nothing(lvm: FakeLvm, cls: str) -> None:
    b = await started(lvm)
    vids = [(await b.create_volume(spec(n, cls))).id for n in ("a", "b")]
    fail_nth_snapshot(b, lvm, 2)
    with pytest.raises(ResourceExhausted):
        await b.create_group_snapshot("g", vids)
    await assert_no_group(b, lvm, "g")
    g = await b.create_group_snapshot("g", vids)  # the retry, once there is room
    assert sorted(s.source_volume_id for s in g.snapshots) == sorted(vids)
    assert await b.get_group_snapshot(g.id) == g
    assert [lv.name for lv in snapshot_lvs(lvm) if "elv.pending" in lv.tags] == []
    await b.delete_group_snapshot(g.id)
    await assert_no_group(b, lvm, "g")


async def test_a_refused_member_makes_nothing(lvm: FakeLvm) -> None:
    b = await started(lvm)
    a = (await b.create_volume(spec("a", "thin"))).id
    for other in (str(ids.new("v", "thin", "gone")), str(ids.new("v", "loop", "a")), "v-nope"):
        with pytest.raises(NotFound):
            await b.create_group_snapshot("g", [a, other])
        await assert_no_group(b, lvm, "g")


def member(gid: str, n: int, *, pending: bool, count: int = 2) -> FakeLv:
    tags = [OWNER, "elv.kind=s", f"elv.group={gid}", f"elv.gname={hex_encode('g')}", f"elv.gcount={count}"]
    tags += [f"elv.src=v-thin-{n:032x}", "elv.size=67108864", "elv.created=1"]
    tags += ["elv.pending"] if pending else []
    return FakeLv(f"elv-s-thin-{gid[-8:]}{n:024x}", "vg0", 64 * MiB, "thin", tags, "pool0", active=False)


async def test_startup_removes_a_group_a_crash_left_unfinished(lvm: FakeLvm) -> None:
    """A kill while the members were being made (all pending) or let go
    (some pending): the whole group goes. A finished group stays."""
    making, letting_go, done = (str(ids.new("g", "thick", n)) for n in ("making", "letting-go", "done"))
    lvm.add(member(making, 1, pending=True))
    lvm.add(member(letting_go, 2, pending=False))
    lvm.add(member(letting_go, 3, pending=True))
    lvm.add(member(done, 4, pending=False))
    lvm.add(member(done, 5, pending=False))
    b = await started(lvm)
    await b.wiper.pass_once()
    assert sorted(lv.tags[2] for lv in snapshot_lvs(lvm)) == [f"elv.group={done}"] * 2
    assert await b.get_group_snapshot(making) is None
    assert await b.get_group_snapshot(letting_go) is None
    g = await b.get_group_snapshot(done)
    assert g is not None and len(g.snapshots) == 2


async def test_an_unfinished_or_half_deleted_group_is_not_shown(lvm: FakeLvm) -> None:
    letting_go, half = str(ids.new("g", "thick", "letting-go")), str(ids.new("g", "thick", "half"))
    b = await started(lvm)
    lvm.add(member(letting_go, 1, pending=False))
    lvm.add(member(letting_go, 2, pending=True))
    lvm.add(member(half, 3, pending=False))  # its other member is deleted already
    b.store.inv.invalidate()
    assert await b.get_group_snapshot(letting_go) is None
    assert await b.get_group_snapshot(half) is None
    await b.delete_group_snapshot(half)  # finishes it
    await b.delete_group_snapshot(letting_go)
    await b.wiper.pass_once()
    assert snapshot_lvs(lvm) == []
