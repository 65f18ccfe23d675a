"""NodeOps logic that needs no mount: option mapping and the format-only-if-blank rule.
(Stage, publish and teardown over an in-memory mount table: test_node_teardown.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from csi.errors import FailedPrecondition, InvalidArgument
from csi.host import syscalls
from csi.host.fs import FsTool
from csi.host.paths import PathGuard
from csi.model import AccessType, Capability, Device, Mode
from csi.node.mounts import bind_bits, mount_options
from csi.node.ops import NodeOps
from tests.support.fakes import FakeBackend, FakeRunner, FakeViews

DEV = Device(name="loop40", path="/dev/loop40", major=7, minor=40)


def test_mount_options_split_bits_and_data() -> None:
    bits, data = mount_options(("noatime", "nodev", "ro", "data=ordered", "errors=remount-ro", "discard"), "ext4")
    assert bits == syscalls.MS_NOATIME | syscalls.MS_NODEV | syscalls.MS_RDONLY
    assert data == "data=ordered,errors=remount-ro,discard"
    assert mount_options((), "ext4") == (0, None)
    assert mount_options(("rw",), "ext4") == (0, None)


def test_xfs_always_gets_nouuid() -> None:
    assert mount_options((), "xfs") == (0, "nouuid")
    assert mount_options(("inode64", "noquota"), "xfs") == (0, "inode64,noquota,nouuid")


@pytest.mark.parametrize(("flag", "fs"), [("inode64", "ext4"), ("data=journal", "xfs"), ("nobarrier", "xfs")])
def test_options_of_the_other_filesystem_are_refused(flag: str, fs: str) -> None:
    with pytest.raises(InvalidArgument, match=f"does not apply to {fs}"):
        mount_options((flag,), fs)


def test_bind_bits() -> None:
    assert bind_bits((), False) == 0
    assert bind_bits((), True) == syscalls.MS_RDONLY
    assert bind_bits(("noexec", "data=ordered", "sync", "nosuid"), False) == syscalls.MS_NOEXEC | syscalls.MS_NOSUID


def make_ops(tmp_path: Path, blkid: tuple[int, bytes, bytes]) -> tuple[NodeOps, FakeBackend, FakeRunner]:
    backend = FakeBackend()
    runner = FakeRunner({"blkid": blkid})
    (tmp_path / "kubelet").mkdir(exist_ok=True)
    ops = NodeOps(backend, PathGuard(str(tmp_path / "kubelet")), FsTool(runner), FakeViews())  # type: ignore[arg-type]
    return ops, backend, runner


def programs(runner: FakeRunner) -> list[str]:
    return [argv[0] for argv in runner.argvs()]


async def test_blank_device_is_formatted_and_recorded(tmp_path: Path, data_dir: Path) -> None:
    ops, backend, runner = make_ops(tmp_path, (2, b"", b""))
    vol = backend.add_volume("a")
    assert await ops._format_if_blank(vol, DEV, "xfs") is True
    assert programs(runner) == ["blkid", "mkfs.xfs"]
    # The intent is recorded before mkfs starts, the result after it ends.
    assert backend.called("mark_formatted") == [(vol.id, "xfs", False), (vol.id, "xfs", True)]
    assert backend.methods()[-2:] == ["mark_formatted", "mark_formatted"]
    assert backend.volumes[vol.id].formatted == "xfs"
    assert backend.volumes[vol.id].formatting is None
    mkfs = runner.argvs()[1]
    assert "-f" not in mkfs


async def test_interrupted_mkfs_is_redone_with_force(tmp_path: Path, data_dir: Path) -> None:
    # blkid sees our own half-written ext4; the record says mkfs started and never finished.
    ops, backend, runner = make_ops(tmp_path, (0, (data_dir / "blkid-ext4.txt").read_bytes(), b""))
    vol = backend.add_volume("a", formatting="ext4")
    assert await ops._format_if_blank(vol, DEV, "ext4") is True
    assert programs(runner) == ["blkid", "mkfs.ext4"]
    assert "-F" in runner.argvs()[1]
    assert backend.volumes[vol.id].formatted == "ext4"


async def test_interrupted_mkfs_on_a_blank_device_does_not_force(tmp_path: Path) -> None:
    ops, backend, runner = make_ops(tmp_path, (2, b"", b""))
    vol = backend.add_volume("a", formatting="ext4")
    assert await ops._format_if_blank(vol, DEV, "ext4") is True
    assert "-F" not in runner.argvs()[1]


async def test_blank_device_of_a_formatted_volume_is_never_reformatted(tmp_path: Path) -> None:
    ops, backend, runner = make_ops(tmp_path, (2, b"", b""))
    vol = backend.add_volume("a", formatted="ext4")
    with pytest.raises(FailedPrecondition, match="refusing to format it again"):
        await ops._format_if_blank(vol, DEV, "ext4")
    assert programs(runner) == ["blkid"]


async def test_existing_filesystem_is_kept(tmp_path: Path, data_dir: Path) -> None:
    ops, backend, runner = make_ops(tmp_path, (0, (data_dir / "blkid-ext4.txt").read_bytes(), b""))
    vol = backend.add_volume("a")
    assert await ops._format_if_blank(vol, DEV, "ext4") is False
    assert programs(runner) == ["blkid"]
    # A volume found formatted (e.g. a clone) gets the durable record.
    assert backend.called("mark_formatted") == [(vol.id, "ext4", True)]


async def test_other_filesystem_is_refused(tmp_path: Path, data_dir: Path) -> None:
    ops, backend, runner = make_ops(tmp_path, (0, (data_dir / "blkid-xfs.txt").read_bytes(), b""))
    vol = backend.add_volume("a")
    with pytest.raises(FailedPrecondition, match="holds xfs, not ext4; refusing to format over existing data"):
        await ops._format_if_blank(vol, DEV, "ext4")
    assert programs(runner) == ["blkid"]
    assert backend.called("mark_formatted") == []


async def test_partition_table_is_data_too(tmp_path: Path, data_dir: Path) -> None:
    ops, backend, runner = make_ops(tmp_path, (0, (data_dir / "blkid-dos-pttable.txt").read_bytes(), b""))
    vol = backend.add_volume("a")
    with pytest.raises(FailedPrecondition, match="PTTYPE=dos") as ei:
        await ops._format_if_blank(vol, DEV, "ext4")
    assert "refusing to format over existing data" in ei.value.message
    assert programs(runner) == ["blkid"]


def cap(access: AccessType = AccessType.MOUNT, fs: str | None = None) -> Capability:
    return Capability(access, Mode.SINGLE_NODE_WRITER, fs, ())


def test_check_access(tmp_path: Path) -> None:
    ops, backend, _ = make_ops(tmp_path, (2, b"", b""))
    plain = backend.add_volume("plain", fs_type=None)
    assert ops._check_access(plain, cap()) == "ext4"
    assert ops._check_access(plain, cap(fs="xfs")) == "xfs"
    xfs = backend.add_volume("xfs", fs_type="xfs")
    assert ops._check_access(xfs, cap()) == "xfs"
    with pytest.raises(FailedPrecondition, match="holds xfs; it cannot be used as ext4"):
        ops._check_access(xfs, cap(fs="ext4"))
    formatted = backend.add_volume("fmt", fs_type=None, formatted="xfs")
    with pytest.raises(FailedPrecondition):
        ops._check_access(formatted, cap(fs="ext4"))
    block = backend.add_volume("blk", access=AccessType.BLOCK, fs_type=None)
    assert ops._check_access(block, cap(AccessType.BLOCK)) is None
    with pytest.raises(FailedPrecondition, match="created for block access, not mount"):
        ops._check_access(block, cap())


async def test_unpublish_of_a_missing_target_is_a_no_op(tmp_path: Path) -> None:
    ops, backend, runner = make_ops(tmp_path, (2, b"", b""))
    await ops.unpublish("v-fake-" + "0" * 32, f"{tmp_path}/kubelet/pods/uid/volumes/x/mount")
    assert runner.calls == []
    assert backend.calls == []
