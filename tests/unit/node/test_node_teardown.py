"""Node calls touch only the volume's own work (issue 15, items 1-4).

NodeOps over an in-memory mount table (tests/support/fake_mounts.py), on both
backends: the fake backend (the loop backend's semantics, devices 7:N) and the
LVM backend over the fake LVM (device-mapper disks 254:N). Teardown at a path
holding something that is not the volume's answers OK and changes nothing; a
failed stage or publish leaves nothing behind; and no order of calls leaves
a volume that cannot be torn down and deleted.
"""

from __future__ import annotations

import errno
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from csi.backend.lvm.recovery import recover
from csi.errors import CommandError, ElvError, FailedPrecondition, InUse
from csi.host.fs import FsTool
from csi.host.mountinfo import Mount
from csi.host.paths import PathGuard
from csi.model import DEVICE_CLASS, AccessType, Capability, Device, Mode, VolumeSpec
from csi.node import ops as ops_module
from csi.node.mounts import STAGED
from csi.node.ops import NodeOps
from tests.support.fake_lvm import CLASSES, FakeLv, FakeLvm, GiB, MiB, backend_over, fake_sysfs
from tests.support.fake_mounts import FakeMounts
from tests.support.fakes import FakeBackend, FakeRunner, FakeViews

LVM_CONFIG = f"""
default-class = "thin"
udev = "off"
freeze-dir = "/nonexistent/elv-freeze"
{CLASSES}"""


def cap(block: bool = False, mode: Mode = Mode.SINGLE_NODE_WRITER, flags: tuple[str, ...] = ()) -> Capability:
    if block:
        return Capability(AccessType.BLOCK, mode, None, flags)
    return Capability(AccessType.MOUNT, mode, "ext4", flags)


@dataclass
class Host:
    ops: NodeOps
    mounts: FakeMounts
    views: FakeViews
    backend: Any
    lvm: FakeLvm | None
    kubelet: str

    def path(self, *parts: str) -> str:
        return os.path.join(self.kubelet, *parts)

    async def volume(self, name: str, block: bool = False, fs: str = "ext4") -> str:
        if self.lvm is None:
            fields: dict[str, Any] = {"access": AccessType.BLOCK, "fs_type": None} if block else {"fs_type": fs}
            return str(self.backend.add_volume(name, **fields).id)
        spec = VolumeSpec(
            name=name,
            size=64 * MiB,
            access=AccessType.BLOCK if block else AccessType.MOUNT,
            fs_type=None if block else fs,
            parameters={DEVICE_CLASS: "thin"},
        )
        vid = (await self.backend.create_volume(spec)).id
        self.lvm.lvs[("vg0", "elv-" + vid)].active = False  # lvcreate -an (the fake ignores it)
        self.backend.store.inv.invalidate()
        return str(vid)

    async def device(self, vid: str) -> Device | None:
        return await self.backend.find_device(vid)  # type: ignore[no-any-return]

    def mine(self, dev: Device) -> list[Mount]:
        """Every mount of the device or of a view of it (the test's own reading)."""
        names = {dev.name} | {n for n, src in self.views.over.items() if src == dev}
        return [
            m
            for m in self.mounts.mounts
            if (m.major, m.minor) == (dev.major, dev.minor) or (m.fstype == "devtmpfs" and m.root[1:] in names)
        ]


@pytest.fixture(params=["loop", "lvm"])
async def host(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    lvm: FakeLvm | None = None
    backend: Any
    if request.param == "loop":
        backend = FakeBackend()
    else:
        lvm = FakeLvm()
        lvm.add(FakeLv("pool0", "vg0", 8 * GiB, "thin-pool"))
        fake_sysfs(monkeypatch, lvm)
        backend = backend_over(lvm, LVM_CONFIG)
        await recover(backend.store, backend.wiper)
    kubelet = tmp_path / "kubelet"
    kubelet.mkdir()
    views = FakeViews()
    ops = NodeOps(backend, PathGuard(str(kubelet)), FsTool(FakeRunner()), views)  # type: ignore[arg-type]
    mounts = FakeMounts(ops.guard).install(ops, monkeypatch)

    async def no(*_: object) -> bool:
        return False  # formatting has tests of its own (test_node_ops.py)

    monkeypatch.setattr(ops, "_format_if_blank", no)
    monkeypatch.setattr(ops, "_smaller", no)
    return Host(ops, mounts, views, backend, lvm, str(kubelet))


async def staged(h: Host, name: str, block: bool = False, published: bool = False) -> tuple[str, str, str, Device]:
    vid = await h.volume(name, block)
    staging, target = h.path("st", name), h.path("pods", name, "dev" if block else "vol")
    await h.ops.stage(vid, staging, cap(block))
    if published:
        await h.ops.publish(vid, staging, target, cap(block), False)
    dev = await h.device(vid)
    assert dev is not None
    return vid, staging, target, dev


# -- item 1: what is not the volume's is never touched --------------------------------------


@pytest.mark.parametrize("is_staged", [False, True])
@pytest.mark.parametrize("rpc", ["unpublish", "unstage"])
async def test_a_foreign_mount_is_left_alone(host: Host, rpc: str, is_staged: bool) -> None:
    vid = await host.volume("a")
    if is_staged:
        await host.ops.stage(vid, host.path("st", "a"), cap())
    dev = await host.device(vid)
    foreign = host.path("pods", "p", "x")
    os.makedirs(foreign)
    theirs = host.mounts.add_foreign(foreign)
    before = list(host.mounts.mounts)
    await getattr(host.ops, rpc)(vid, foreign)
    assert host.mounts.mounts == before and host.mounts.top(foreign) == theirs
    assert os.path.isdir(foreign)
    assert await host.device(vid) == dev, "the volume's own stage was undone"


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
async def test_another_volumes_paths_are_left_alone(host: Host, block: bool) -> None:
    b, sb, tb, dev_b = await staged(host, "b", block, published=True)
    a = await host.volume("a", block)
    before = list(host.mounts.mounts)
    for a_staged in (False, True):
        if a_staged:
            await host.ops.stage(a, host.path("st", "a"), cap(block))
        for path in (tb, sb, os.path.join(sb, STAGED)):
            await host.ops.unpublish(a, path)
            await host.ops.unstage(a, path)
        assert [m for m in host.mounts.mounts if m in before] == before, "B's mounts were touched"
        assert await host.device(b) == dev_b
    dev_a = await host.device(a)
    assert dev_a is not None, "A's stage was undone by calls about B's paths"
    assert host.mine(dev_a) != [] if block else True


@pytest.mark.parametrize(
    "vid", ["v-fake-" + "0" * 32, "v-thin-" + "1" * 32, "not-an-id", "../../etc", "s-fake-" + "2" * 32]
)
async def test_unknown_or_malformed_ids_touch_nothing(host: Host, vid: str) -> None:
    _, sb, tb, _ = await staged(host, "b", published=True)
    empty = host.path("pods", "b", "empty")
    os.makedirs(empty)
    foreign = host.path("pods", "b", "foreign")
    os.makedirs(foreign)
    host.mounts.add_foreign(foreign)
    before = list(host.mounts.mounts)
    for path in (tb, sb, empty, foreign):
        await host.ops.unpublish(vid, path)
        await host.ops.unstage(vid, path)
    assert host.mounts.mounts == before
    assert os.path.isdir(empty), "an unknown volume's teardown removed a directory"


async def test_ours_on_top_of_a_foreign_mount_is_peeled_off_alone(host: Host) -> None:
    vid, staging, _, dev = await staged(host, "a")
    target = host.path("pods", "p", "vol")
    os.makedirs(target)
    theirs = host.mounts.add_foreign(target)
    host.mounts.add_device(target, dev)
    host.mounts.add_device(target, dev)  # twice: a retried bind
    await host.ops.unpublish(vid, target)
    assert host.mounts.stack(target) == [theirs]
    assert os.path.isdir(target), "a path that is still a mount point was removed"
    await host.ops.unstage(vid, staging)
    assert host.mounts.stack(target) == [theirs]
    assert await host.device(vid) is None


@pytest.mark.parametrize("rpc", ["unpublish", "unstage"])
@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
async def test_a_foreign_mount_on_top_of_ours_is_refused(host: Host, rpc: str, block: bool) -> None:
    vid, staging, target, dev = await staged(host, "a", block, published=rpc == "unpublish")
    path = target if rpc == "unpublish" else (os.path.join(staging, STAGED) if block else staging)
    host.mounts.add_foreign(path)
    before = list(host.mounts.mounts)
    with pytest.raises(FailedPrecondition, match="unmount it first"):
        await getattr(host.ops, rpc)(vid, staging if rpc == "unstage" else path)
    assert host.mounts.mounts == before
    assert await host.device(vid) == dev


async def test_plain_paths_holding_data_are_kept(host: Host) -> None:
    vid, _, _, dev = await staged(host, "a")
    full = host.path("pods", "p", "dir")
    os.makedirs(full)
    Path(full, "data").write_text("user data")
    file = host.path("pods", "p", "file")
    Path(file).write_text("user data")
    for path in (full, file):
        await host.ops.unpublish(vid, path)
        await host.ops.unstage(vid, path)
    assert Path(full, "data").read_text() == "user data" and Path(file).read_text() == "user data"
    assert await host.device(vid) == dev
    # The volume's own empty target goes (kubelet wants it gone) ...
    empty = host.path("pods", "p", "empty")
    os.makedirs(empty)
    await host.ops.unpublish(vid, empty)
    assert not os.path.exists(empty)
    # ... but not one named under a volume this driver does not have.
    os.makedirs(empty)
    await host.ops.unpublish(vid[:-1] + ("0" if vid[-1] != "0" else "1"), empty)
    assert os.path.isdir(empty)


async def test_unstage_while_published_is_in_use(host: Host) -> None:
    vid, staging, _, _ = await staged(host, "a", published=True)
    before = list(host.mounts.mounts)
    with pytest.raises(InUse, match="still published at"):
        await host.ops.unstage(vid, staging)
    assert host.mounts.mounts == before


@pytest.mark.parametrize(("err", "exc"), [(errno.EBUSY, InUse), (errno.EPERM, ElvError)])
async def test_umount_errors(host: Host, err: int, exc: type[Exception]) -> None:
    vid, staging, _, dev = await staged(host, "a")
    host.mounts.fail["umount"] = OSError(err, os.strerror(err))
    with pytest.raises(exc):
        await host.ops.unstage(vid, staging)
    assert await host.device(vid) == dev, "detached under a mount that is still there"


async def test_a_mount_that_stays_after_umount_is_reported_not_retried_forever(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    vid, staging, _, _ = await staged(host, "a")

    def umount(*_: object) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(host.ops.guard, "umount", umount)
    with pytest.raises(ElvError, match="still a mount point"):
        await host.ops.unstage(vid, staging)


# -- item 2: one staging path at a time -----------------------------------------------------


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
async def test_a_second_staging_path_is_refused(host: Host, block: bool) -> None:
    vid, p1, _, dev = await staged(host, "a", block)
    p2 = host.path("st", "other")
    with pytest.raises(FailedPrecondition, match="one path at a time"):
        await host.ops.stage(vid, p2, cap(block))
    assert host.mounts.under(p2) == [] and not os.path.exists(p2)
    await host.ops.unstage(vid, p2)
    assert await host.device(vid) == dev
    await host.ops.unstage(vid, p1)
    assert await host.device(vid) is None
    assert host.mounts.mounts == []


STEPS = ("stage1", "stage2", "publish1", "publish2", "publish-ro", "unpublish", "unpublish-ro", "unstage1", "unstage2")


async def step(h: Host, vid: str, block: bool, name: str) -> str:
    p = {"1": h.path("st", "p1"), "2": h.path("st", "p2")}
    t, ro = h.path("pods", "x", "t"), h.path("pods", "y", "t")
    try:
        if name.startswith("stage"):
            await h.ops.stage(vid, p[name[-1]], cap(block))
        elif name == "publish-ro":
            await h.ops.publish(vid, p["1"], ro, cap(block), True)
        elif name.startswith("publish"):
            await h.ops.publish(vid, p[name[-1]], t, cap(block), False)
        elif name.startswith("unpublish"):
            await h.ops.unpublish(vid, ro if name.endswith("ro") else t)
        else:
            await h.ops.unstage(vid, p[name[-1]])
    except ElvError as e:
        return e.code.name
    return "OK"


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
async def test_no_order_of_calls_leaves_a_volume_stuck(host: Host, block: bool) -> None:
    """Every sequence of three calls over two staging paths and two targets
    (one read-only), then a CO's teardown: every teardown call succeeds, the
    volume is detached and deleted, and nothing of it is left mounted."""
    for n, seq in enumerate(itertools.product(STEPS, repeat=3)):
        vid = await host.volume(f"v{n}", block)
        codes = [await step(host, vid, block, s) for s in seq]
        assert set(codes) <= {"OK", "FAILED_PRECONDITION", "ALREADY_EXISTS"}, (seq, codes)
        for s in ("unpublish", "unpublish-ro", "unstage1", "unstage2"):
            assert await step(host, vid, block, s) == "OK", (seq, codes, s)
        assert host.mounts.mounts == [], (seq, codes)
        assert host.views.over == {}, (seq, codes)
        assert await host.device(vid) is None, (seq, codes)
        for path in (host.path("pods", "x", "t"), host.path("pods", "y", "t")):
            assert not os.path.exists(path), (seq, codes, path)
        await host.backend.delete_volume(vid)


async def test_raw_block_where_dev_is_a_tmpfs(host: Host) -> None:
    """Where /dev is a container's tmpfs (ELV makes LV nodes there), a node's
    bind shows as tmpfs: stages, publishes and views are still the volume's."""
    host.mounts.dev_fs = "tmpfs"
    vid, staging, target, _ = await staged(host, "a", block=True, published=True)
    ro = host.path("pods", "ro", "dev")
    await host.ops.publish(vid, staging, ro, cap(True), True)
    await host.ops.publish(vid, staging, target, cap(True), False)  # a repeat
    with pytest.raises(FailedPrecondition, match="one path at a time"):
        await host.ops.stage(vid, host.path("st", "other"), cap(True))
    with pytest.raises(InUse):
        await host.ops.unstage(vid, staging)
    await host.ops.unpublish(vid, target)
    await host.ops.unpublish(vid, ro)
    await host.ops.unstage(vid, staging)
    assert host.mounts.mounts == [] and host.views.over == {}
    assert await host.device(vid) is None


# -- item 3: read-only raw block, and failed calls that leave nothing --------------------------


async def test_readonly_block_binds_a_readonly_view(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops_module, "device_size", lambda path: 64 * MiB)
    vid, staging, _, dev = await staged(host, "a", block=True)
    ro, rw = host.path("pods", "a", "dev"), host.path("pods", "b", "dev")
    await host.ops.publish(vid, staging, ro, cap(True), True)
    ((view, src),) = host.views.over.items()
    assert src == dev
    top = host.mounts.top(ro)
    assert top is not None and top.root == "/" + view and top.readonly
    await host.ops.publish(vid, staging, ro, cap(True), True)  # a repeat
    with pytest.raises(ElvError, match="readonly=True"):
        await host.ops.publish(vid, staging, ro, cap(True), False)
    await host.ops.publish(vid, staging, rw, cap(True), False)
    top = host.mounts.top(rw)
    assert top is not None and top.root == "/" + dev.name
    with pytest.raises(ElvError, match="readonly=False"):
        await host.ops.publish(vid, staging, rw, cap(True), True)
    # Stats find the view too.
    assert (await host.ops.stats(vid, ro)).total == 64 * MiB
    await host.ops.unpublish(vid, ro)
    assert host.views.over == {}, "the view outlived its last publish"
    await host.ops.unpublish(vid, rw)
    await host.ops.unstage(vid, staging)
    assert host.mounts.mounts == [] and await host.device(vid) is None


@pytest.mark.parametrize(
    ("block", "readonly", "flags", "op"),
    [
        (False, False, (), "bind"),
        (False, True, (), "remount"),
        (False, False, ("nosuid",), "remount"),
        (True, False, (), "mount"),
        (True, True, (), "mount"),
        (True, True, (), "remount"),
        (True, False, ("nodev",), "remount"),
    ],
)
async def test_a_failed_publish_leaves_nothing(
    host: Host, block: bool, readonly: bool, flags: tuple[str, ...], op: str
) -> None:
    vid, staging, _, dev = await staged(host, "a", block)
    target = host.path("pods", "new", "volumes", "dev" if block else "vol")
    before = list(host.mounts.mounts)
    host.mounts.fail[op] = OSError(errno.EPERM, "Operation not permitted")
    with pytest.raises(ElvError):
        await host.ops.publish(vid, staging, target, cap(block, flags=flags), readonly)
    assert host.mounts.mounts == before, "a failed publish left a mount"
    assert host.views.over == {}, "a failed publish left a read-only view"
    assert not os.path.exists(host.path("pods")), "a failed publish left what it created"
    # The volume is as it was: staged, and its teardown works.
    assert await host.device(vid) == dev
    await host.ops.unstage(vid, staging)
    assert host.mounts.mounts == []


async def test_a_failed_publish_keeps_a_target_it_did_not_make(host: Host) -> None:
    vid, staging, target, _ = await staged(host, "a")
    os.makedirs(target)
    host.mounts.fail["remount"] = OSError(errno.EPERM, "Operation not permitted")
    with pytest.raises(ElvError):
        await host.ops.publish(vid, staging, target, cap(), True)
    assert os.path.isdir(target) and host.mounts.top(target) is None


async def test_a_failed_stage_leaves_nothing(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    vid = await host.volume("a", fs="xfs")
    staging = host.path("plugins", "x", "globalmount")

    async def grow(*_: object) -> None:
        raise CommandError(["xfs_growfs"], 1, b"", b"boom")

    monkeypatch.setattr(host.ops, "_grow_if_smaller", grow)
    with pytest.raises(CommandError):
        await host.ops.stage(vid, staging, Capability(AccessType.MOUNT, Mode.SINGLE_NODE_WRITER, "xfs", ()))
    assert host.mounts.mounts == [], "a failed stage left its mount"
    assert not os.path.exists(host.path("plugins")), "a failed stage left what it created"
    assert await host.device(vid) is None, "a failed stage left the device attached"


async def test_a_failed_block_stage_leaves_nothing(host: Host) -> None:
    vid = await host.volume("a", block=True)
    staging = host.path("plugins", "x", "staging")
    host.mounts.fail["mount"] = OSError(errno.EPERM, "Operation not permitted")
    with pytest.raises(ElvError):
        await host.ops.stage(vid, staging, cap(True))
    assert host.mounts.mounts == []
    assert not os.path.exists(host.path("plugins"))
    assert await host.device(vid) is None


async def test_a_refused_repeat_stage_keeps_the_stage(host: Host) -> None:
    """A repeat with other mount flags is refused; the stage it found was not its to undo."""
    vid, staging, _, dev = await staged(host, "a")
    before = list(host.mounts.mounts)
    with pytest.raises(ElvError, match="other mount flags"):
        await host.ops.stage(vid, staging, cap(flags=("ro",)))
    assert host.mounts.mounts == before and await host.device(vid) == dev


# -- expansion grows through the volume's own read-write mount -------------------------------


def sized(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    async def refresh(volume_id: str) -> int:
        return 64 * MiB  # the fake LVM's devices are not in /dev to be measured

    monkeypatch.setattr(host.backend, "refresh_device", refresh)


@pytest.mark.parametrize("via", ["staging", "rw-publish", "ro-publish"])
async def test_expand_grows_through_the_writable_mount(host: Host, monkeypatch: pytest.MonkeyPatch, via: str) -> None:
    """NodeExpandVolume's path may be a read-only publish, whose mount cannot
    grow a filesystem (EROFS); the growth goes through the staging mount."""
    vid, staging, target, dev = await staged(host, "a")
    await host.ops.publish(vid, staging, target, cap(), via == "ro-publish")
    grown: list[tuple[str, str, str]] = []

    async def smaller(*_: object) -> bool:
        return True

    async def grow(fs_type: str, device: str, mount_point: str) -> None:
        grown.append((fs_type, device, mount_point))

    monkeypatch.setattr(host.ops, "_smaller", smaller)
    monkeypatch.setattr(host.ops.fs, "grow", grow)
    sized(host, monkeypatch)
    path = staging if via == "staging" else target
    before = list(host.mounts.mounts)
    await host.ops.expand(vid, path, 0)
    assert grown == [("ext4", dev.path, os.path.realpath(staging))]
    assert host.mounts.mounts == before


async def test_expand_of_a_volume_mounted_only_read_only_is_refused(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    vid = await host.volume("a")
    staging = host.path("st", "a")
    await host.ops.stage(vid, staging, cap(flags=("ro",)))

    async def smaller(*_: object) -> bool:
        return True

    async def grow(*_: object) -> None:
        pytest.fail("nothing writable to grow through")

    monkeypatch.setattr(host.ops, "_smaller", smaller)
    monkeypatch.setattr(host.ops.fs, "grow", grow)
    sized(host, monkeypatch)
    with pytest.raises(FailedPrecondition, match="mounted only read-only"):
        await host.ops.expand(vid, staging, 0)
