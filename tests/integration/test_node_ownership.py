"""Node teardown undoes only the volume's own work (issue 15, items 1-3).

NodeUnpublishVolume and NodeUnstageVolume, given a path where something else
is mounted (another volume, a mount ELV did not make, user data), answer OK
and touch nothing; a mount of the volume's own stacked on or under a foreign
one is handled without touching the foreign one. A volume is staged at one
path at a time and can always be torn down and deleted, whatever order the
calls came in. A read-only raw block publish works and is read-only, and a
failed publish or stage leaves nothing behind.

Every check reads the host directly (tests/support/observe.py).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import subprocess
from collections.abc import Callable, Iterator

import grpc
import pytest

from csi.v1 import csi_pb2
from tests.support import observe
from tests.support.driver import Driver, MiB
from tests.support.rpc import block_cap, code_of, mount_cap

OK = grpc.StatusCode.OK
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
Foreign = Callable[[str], str]


def image(d: Driver, vid: str) -> str:
    return os.path.realpath(os.path.join(d.pool, "volumes", vid + ".img"))


def loop_of(d: Driver, vid: str) -> str | None:
    found = [x.path for x in observe.loops() if x.backing_file == image(d, vid) and not x.deleted]
    assert len(found) <= 1, f"two loop devices for one volume: {found}"
    return found[0] if found else None


def shows(m: observe.Mounted | None, device: str) -> bool:
    """Whether the mount is the device's filesystem or a bind of its node (the test's own reading)."""
    if m is None:
        return False
    major, minor = observe.device_numbers(device)
    return (m.major, m.minor) == (major, minor) or (m.fstype == "devtmpfs" and m.root == "/" + device[5:])


@pytest.fixture
def foreign(driver: Driver) -> Iterator[Foreign]:
    """Mount a tmpfs ELV did not make, holding a file; unmounted at the end whatever happens."""
    made: list[str] = []

    def mount(path: str) -> str:
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "foreign", path], check=True)
        made.append(path)
        with open(os.path.join(path, "keep"), "w") as f:
            f.write("not ELV's")
        return path

    yield mount
    for path in reversed(made):
        with contextlib.suppress(subprocess.CalledProcessError):
            while observe.top(path) is not None and observe.top(path).source == "foreign":  # type: ignore[union-attr]
                subprocess.run(["umount", path], check=True, capture_output=True)


def foreign_intact(path: str) -> None:
    top = observe.top(path)
    assert top is not None and top.fstype == "tmpfs" and top.source == "foreign", f"the foreign mount at {path} is gone"
    with open(os.path.join(path, "keep")) as f:
        assert f.read() == "not ELV's"


def unmount_foreign(path: str) -> None:
    top = observe.top(path)
    assert top is not None and top.source == "foreign"
    subprocess.run(["umount", path], check=True)


def teardown(d: Driver, vid: str, staging: str, *targets: str) -> None:
    for t in targets:
        d.unpublish(vid, t)
    d.unstage(vid, staging)
    d.delete(vid)


# -- item 1: a foreign mount, another volume's mount, user data ---------------------------


@pytest.mark.parametrize("rpc", ["unpublish", "unstage"])
def test_teardown_leaves_a_foreign_mount_alone(driver: Driver, foreign: Foreign, rpc: str) -> None:
    vid = driver.create("mine")
    staging = driver.path("st", "mine")
    path = foreign(driver.path("pods", "p", "x"))
    call = driver.unpublish if rpc == "unpublish" else driver.unstage
    # The volume is not staged anywhere: nothing at the path can be its.
    assert code_of(call, vid, path) == OK
    foreign_intact(path)
    # Staged (at its own path): still nothing of it at the foreign path.
    driver.stage(vid, staging)
    assert code_of(call, vid, path) == OK
    foreign_intact(path)
    assert shows(observe.top(staging), loop_of(driver, vid) or "/dev/null"), "the volume's own stage was undone"
    unmount_foreign(path)
    teardown(driver, vid, staging)


def test_cleanup_after_a_stage_refused_by_a_foreign_mount(driver: Driver, foreign: Foreign) -> None:
    vid = driver.create("refused")
    staging = foreign(driver.path("st", "refused"))
    assert code_of(driver.stage, vid, staging) == ALREADY_EXISTS
    assert loop_of(driver, vid) is None, "a refused stage leaves no loop device"
    # The CO's cleanup call after the failed stage.
    assert code_of(driver.unstage, vid, staging) == OK
    foreign_intact(staging)
    assert code_of(driver.unstage, vid, staging) == OK
    foreign_intact(staging)
    unmount_foreign(staging)
    driver.delete(vid)


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_cleanup_after_a_publish_refused_by_a_foreign_mount(driver: Driver, foreign: Foreign, block: bool) -> None:
    cap = block_cap() if block else mount_cap()
    vid = driver.create("refused", 32 * MiB, cap)
    staging = driver.path("st", "refused")
    driver.stage(vid, staging, cap)
    target = foreign(driver.path("pods", "p", "vol"))
    assert code_of(driver.publish, vid, staging, target, cap) == ALREADY_EXISTS
    foreign_intact(target)
    assert code_of(driver.unpublish, vid, target) == OK
    foreign_intact(target)
    # The volume stays staged, and its teardown still works.
    assert loop_of(driver, vid) is not None
    assert code_of(driver.unstage, vid, staging) == OK
    assert loop_of(driver, vid) is None
    foreign_intact(target)
    unmount_foreign(target)
    driver.delete(vid)


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_teardown_of_one_volume_at_anothers_paths(driver: Driver, block: bool) -> None:
    cap = block_cap() if block else mount_cap()
    a = driver.create("a", 32 * MiB, cap)
    b = driver.create("b", 32 * MiB, cap)
    sa, sb = driver.path("st", "a"), driver.path("st", "b")
    tb = driver.path("pods", "b", "dev" if block else "vol")
    os.makedirs(os.path.dirname(tb))
    driver.stage(b, sb, cap)
    driver.publish(b, sb, tb, cap)
    dev_b = loop_of(driver, b)
    assert dev_b is not None
    before = observe.stack(tb), observe.stack(sb)
    # A is not staged at all, then staged at its own path: neither time is B's work A's to undo.
    for staged in (False, True):
        if staged:
            driver.stage(a, sa, cap)
        assert code_of(driver.unpublish, a, tb) == OK
        assert code_of(driver.unstage, a, sb) == OK
        assert code_of(driver.unstage, a, tb) == OK
        assert (observe.stack(tb), observe.stack(sb)) == before, "B's mounts were touched by A's teardown"
        assert loop_of(driver, b) == dev_b
    assert loop_of(driver, a) is not None, "A's own stage was undone by a call about B's path"
    teardown(driver, a, sa)
    teardown(driver, b, sb, tb)


@pytest.mark.parametrize(
    "vid", ["v-loop-" + "0" * 32, "v-nosuchpool-" + "1" * 32, "not-an-id", "../../etc", "s-loop-" + "2" * 32]
)
def test_unknown_or_malformed_ids_touch_nothing(driver: Driver, vid: str) -> None:
    b = driver.create("b")
    sb, tb = driver.path("st", "b"), driver.path("pods", "b", "vol")
    os.makedirs(os.path.dirname(tb))
    driver.stage(b, sb)
    driver.publish(b, sb, tb)
    plain = driver.path("pods", "b", "empty")
    os.makedirs(plain)
    before = observe.stack(tb), observe.stack(sb)
    for path in (tb, sb, plain):
        assert code_of(driver.unpublish, vid, path) == OK
        assert code_of(driver.unstage, vid, path) == OK
    assert (observe.stack(tb), observe.stack(sb)) == before
    assert os.path.isdir(plain), "an unknown volume's teardown removed a directory"
    os.rmdir(plain)
    teardown(driver, b, sb, tb)


def test_ours_stacked_on_a_foreign_mount(driver: Driver, foreign: Foreign) -> None:
    """A bind of the volume on top of a foreign mount (a mount made by an
    older driver, or by hand): unpublish removes the bind and only the bind."""
    vid = driver.create("over")
    staging = driver.path("st", "over")
    target = foreign(driver.path("pods", "p", "vol"))
    driver.stage(vid, staging)
    subprocess.run(["mount", "--bind", staging, target], check=True)
    assert shows(observe.top(target), loop_of(driver, vid) or "/dev/null")
    assert code_of(driver.unpublish, vid, target) == OK
    foreign_intact(target)
    assert code_of(driver.unpublish, vid, target) == OK
    foreign_intact(target)
    unmount_foreign(target)
    teardown(driver, vid, staging, target)


@pytest.mark.parametrize("rpc", ["unpublish", "unstage"])
def test_foreign_mount_on_top_of_ours(driver: Driver, foreign: Foreign, rpc: str) -> None:
    """Something else mounted over the volume's mount: ELV cannot undo its own
    work without undoing theirs, so it touches neither and says so."""
    vid = driver.create("under")
    staging, target = driver.path("st", "under"), driver.path("pods", "p", "vol")
    os.makedirs(os.path.dirname(target))
    driver.stage(vid, staging)
    path = staging
    if rpc == "unpublish":
        driver.publish(vid, staging, target)
        path = target
    foreign(path)
    call = driver.unpublish if rpc == "unpublish" else driver.unstage
    assert code_of(call, vid, path) == FAILED_PRECONDITION
    foreign_intact(path)
    below = observe.stack(path)[1]
    assert shows(below, loop_of(driver, vid) or "/dev/null"), "the volume's own mount under it is gone"
    unmount_foreign(path)
    if rpc == "unpublish":
        teardown(driver, vid, staging, target)
    else:
        teardown(driver, vid, staging)
    assert not os.path.exists(target)


def test_plain_paths_with_data_are_kept(driver: Driver) -> None:
    vid = driver.create("plain")
    staging = driver.path("st", "plain")
    driver.stage(vid, staging)
    full_dir = driver.path("pods", "p", "dir")
    os.makedirs(full_dir)
    with open(os.path.join(full_dir, "data"), "w") as f:
        f.write("user data")
    full_file = driver.path("pods", "p", "file")
    with open(full_file, "w") as f:
        f.write("user data")
    for path in (full_dir, full_file):
        assert code_of(driver.unpublish, vid, path) == OK
        assert code_of(driver.unstage, vid, path) == OK
    with open(os.path.join(full_dir, "data")) as f:
        assert f.read() == "user data"
    with open(full_file) as f:
        assert f.read() == "user data"
    assert loop_of(driver, vid) is not None, "the volume's stage was undone by a call about another path"
    # An empty target of this volume's: kubelet wants it gone after unpublish.
    empty = driver.path("pods", "p", "empty")
    os.makedirs(empty)
    assert code_of(driver.unpublish, vid, empty) == OK
    assert not os.path.exists(empty)
    os.unlink(full_file)
    os.unlink(os.path.join(full_dir, "data"))
    os.rmdir(full_dir)
    teardown(driver, vid, staging)


# -- item 2: one volume, two staging paths -----------------------------------------------


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_a_second_staging_path_is_refused(driver: Driver, block: bool) -> None:
    cap = block_cap() if block else mount_cap()
    vid = driver.create("twice", 32 * MiB, cap)
    p1, p2 = driver.path("st", "one"), driver.path("st", "two")
    driver.stage(vid, p1, cap)
    assert code_of(driver.stage, vid, p2, cap) == FAILED_PRECONDITION
    assert observe.mounts_under(p2) == [], "the refused stage mounted something"
    assert os.listdir(p2) == [], "the refused stage left something in the directory"
    driver.stage(vid, p1, cap)  # the first path is still a repeat
    assert code_of(driver.unstage, vid, p2) == OK
    assert loop_of(driver, vid) is not None, "unstaging at the other path undid the stage"
    assert observe.mounts_under(p1) != []
    driver.unstage(vid, p1)
    assert observe.mounts_under(p1) == [] and os.listdir(p1) == []
    assert loop_of(driver, vid) is None
    driver.delete(vid)


STEPS = ("stage1", "stage2", "publish1", "publish2", "unpublish", "unstage1", "unstage2")


def run_step(d: Driver, vid: str, cap: csi_pb2.VolumeCapability, step: str, paths: dict[str, str]) -> grpc.StatusCode:
    p = {"1": paths["p1"], "2": paths["p2"]}
    if step.startswith("stage"):
        return code_of(d.stage, vid, p[step[-1]], cap)
    if step.startswith("publish"):
        return code_of(d.publish, vid, p[step[-1]], paths["t"], cap)
    if step == "unpublish":
        return code_of(d.unpublish, vid, paths["t"])
    return code_of(d.unstage, vid, p[step[-1]])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_no_order_of_calls_makes_a_volume_stuck(driver: Driver, block: bool) -> None:
    """Every sequence of three node calls on two staging paths and one target,
    then a CO's teardown (unpublish, unstage both paths): the teardown
    succeeds, the volume is deleted, and nothing of it is left."""
    cap = block_cap() if block else mount_cap()
    paths = {"p1": driver.path("st", "p1"), "p2": driver.path("st", "p2"), "t": driver.path("pods", "p", "t")}
    allowed = {OK, FAILED_PRECONDITION, ALREADY_EXISTS}
    for n, seq in enumerate(itertools.product(STEPS, repeat=3)):
        vid = driver.create(f"order-{n}", 16 * MiB, cap)
        codes = [run_step(driver, vid, cap, s, paths) for s in seq]
        assert set(codes) <= allowed, (seq, codes)
        for step in ("unpublish", "unstage1", "unstage2"):
            assert run_step(driver, vid, cap, step, paths) == OK, (seq, codes, step)
        assert code_of(driver.delete, vid) == OK, (seq, codes)
        assert loop_of(driver, vid) is None, seq
        assert observe.mounts_under(driver.kubelet) == [], (seq, codes)
        assert not os.path.exists(paths["t"]), (seq, codes)


# -- item 3: read-only raw block, and failures that leave nothing ------------------------


def test_readonly_block_publish(driver: Driver) -> None:
    cap = block_cap()
    vid = driver.create("roblk", 16 * MiB, cap)
    staging = driver.path("st", "roblk")
    ro, rw = driver.path("pods", "a", "dev"), driver.path("pods", "b", "dev")
    os.makedirs(os.path.dirname(ro))
    os.makedirs(os.path.dirname(rw))
    driver.stage(vid, staging, cap)
    dev = loop_of(driver, vid)
    assert dev is not None
    with open(dev, "r+b") as f:
        f.write(b"ORIGINAL" * 512)
    driver.publish(vid, staging, ro, cap, readonly=True)
    driver.publish(vid, staging, ro, cap, readonly=True)  # a repeat
    assert code_of(driver.publish, vid, staging, ro, cap, readonly=False) == ALREADY_EXISTS
    assert stat.S_ISBLK(os.stat(ro).st_mode)
    with open(ro, "rb") as f:
        assert f.read(4096) == b"ORIGINAL" * 512, "the read-only target does not show the volume"
    with pytest.raises(OSError) as ei:
        fd = os.open(ro, os.O_WRONLY)
        try:
            os.write(fd, b"X" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert ei.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES), ei.value
    with open(image(driver, vid), "rb") as f:
        assert f.read(4096) == b"ORIGINAL" * 512, "a write through the read-only target reached the volume"
    stats = driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=ro))
    assert stats.usage[0].total == 16 * MiB
    # Growing the volume grows what the read-only target shows.
    grow = csi_pb2.CapacityRange(required_bytes=32 * MiB)
    driver.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(volume_id=vid, capacity_range=grow))
    driver.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(volume_id=vid, volume_path=ro, capacity_range=grow))
    fd = os.open(ro, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == 32 * MiB, "the read-only view kept the old size"
    finally:
        os.close(fd)
    # A writable publish beside it is writable.
    driver.publish(vid, staging, rw, cap)
    with open(rw, "r+b") as f:
        f.write(b"WRITABLE")
    assert code_of(driver.unstage, vid, staging) == FAILED_PRECONDITION
    driver.unpublish(vid, ro)
    driver.unpublish(vid, rw)
    assert not os.path.exists(ro) and not os.path.exists(rw)
    assert observe.loops_over(dev) == [], "a read-only view of the device was left attached"
    driver.unstage(vid, staging)
    with open(image(driver, vid), "rb") as f:
        assert f.read(8) == b"WRITABLE"
    driver.delete(vid)


def test_a_failed_stage_removes_the_directory_it_made(driver: Driver) -> None:
    vid = driver.create("bad", 320 * MiB)
    subprocess.run(["mkfs.xfs", "-q", image(driver, vid)], check=True)
    staging = driver.path("plugins", "x", "globalmount")
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=staging, volume_capability=mount_cap("ext4")
    )
    assert code_of(driver.node.NodeStageVolume, req) == FAILED_PRECONDITION
    assert not os.path.exists(staging), "the failed stage left the directory it made"
    assert loop_of(driver, vid) is None
    driver.delete(vid)
