"""The ext4 online resize without resize2fs: what it reads from a superblock,
the block count it asks for, and what it refuses before touching anything.
The kernel side is tests/integration/test_ext4_resize.py."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from csi.errors import FailedPrecondition
from csi.host import ext4resize, fs
from csi.host.ext4resize import Ext4Geometry, ext4_geometry, grow_mounted, target_blocks
from csi.host.fs import FsTool
from tests.support.fakes import FakeRunner

MiB = 1 << 20


def sb(data_dir: Path, name: str) -> bytes:
    return (data_dir / name).read_bytes()[1024:2048]


def test_geometry_of_captured_superblocks(data_dir: Path) -> None:
    g = ext4_geometry(sb(data_dir, "ext4-64bit-16MiB.sb"))
    assert g is not None and g.has_64bit and not g.has_errors
    assert g.blocks * g.block_size == 16 * MiB
    g = ext4_geometry(sb(data_dir, "ext4-32bit-20MiB.sb"))
    assert g == Ext4Geometry(block_size=4096, blocks=5120, has_64bit=False, has_errors=False)


def test_geometry_reads_the_error_state_and_rejects_garbage(data_dir: Path) -> None:
    raw = bytearray(sb(data_dir, "ext4-32bit-20MiB.sb"))
    struct.pack_into("<H", raw, 0x3A, 0x0003)  # valid | errors
    g = ext4_geometry(bytes(raw))
    assert g is not None and g.has_errors
    struct.pack_into("<I", raw, 0x18, 40)  # a block size no ext4 has
    assert ext4_geometry(bytes(raw)) is None
    assert ext4_geometry(bytes(1024)) is None
    assert ext4_geometry(sb(data_dir, "xfs-300MiB.sb")) is None


def test_target_blocks_rounds_small_blocks_to_whole_pages() -> None:
    g = Ext4Geometry(block_size=1024, blocks=16384, has_64bit=True, has_errors=False)
    assert target_blocks(g, 40 * MiB + 3 * 1024, 4096) == 40 * 1024  # 40963 blocks, down to a page
    assert target_blocks(g, 40 * MiB + 3 * 1024, 1024) == 40 * 1024 + 3
    big = Ext4Geometry(block_size=4096, blocks=5120, has_64bit=True, has_errors=False)
    assert target_blocks(big, 40 * MiB + 3 * 1024, 4096) == 10240  # a partial block is never counted


def test_target_blocks_caps_a_32bit_filesystem() -> None:
    g = Ext4Geometry(block_size=4096, blocks=5120, has_64bit=False, has_errors=False)
    assert target_blocks(g, 20 << 40, 4096) == (1 << 32) - 1
    g64 = Ext4Geometry(block_size=4096, blocks=5120, has_64bit=True, has_errors=False)
    assert target_blocks(g64, 20 << 40, 4096) == (20 << 40) // 4096


def test_grow_refuses_recorded_errors_before_opening_anything(data_dir: Path, tmp_path: Path) -> None:
    raw = bytearray(sb(data_dir, "ext4-32bit-20MiB.sb"))
    struct.pack_into("<H", raw, 0x3A, 0x0002)
    with pytest.raises(FailedPrecondition, match="records errors"):
        grow_mounted("/dev/nonexistent", str(tmp_path / "absent"), bytes(raw), 40 * MiB)
    with pytest.raises(FailedPrecondition, match="no ext4 superblock"):
        grow_mounted("/dev/nonexistent", str(tmp_path / "absent"), bytes(1024), 40 * MiB)


def test_grow_refuses_a_mount_point_not_on_the_device(data_dir: Path, tmp_path: Path) -> None:
    # A regular file is no block device: whatever is at the path, it is not the volume's.
    dev = tmp_path / "dev"
    dev.write_bytes(b"")
    with pytest.raises(FailedPrecondition, match="no longer shows"):
        grow_mounted(str(dev), str(tmp_path), sb(data_dir, "ext4-32bit-20MiB.sb"), 40 * MiB)


def _capable(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    monkeypatch.setattr(fs, "has_capability", lambda cap: True)
    monkeypatch.setattr(fs, "read_head", lambda dev: (data_dir / "ext4-32bit-20MiB.sb").read_bytes())
    monkeypatch.setattr(fs, "device_size", lambda dev: 40 * MiB)


async def test_fstool_grows_ext4_without_a_process(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    _capable(monkeypatch, data_dir)
    seen: list[tuple[str, str, int]] = []

    def grown(dev: str, mnt: str, head: bytes, size: int) -> int:
        seen.append((dev, mnt, len(head)))
        return 40 * MiB

    monkeypatch.setattr(fs, "grow_mounted", grown)
    runner = FakeRunner()
    await FsTool(runner).grow("ext4", "/dev/loop3", "/mnt/x")  # type: ignore[arg-type]
    assert seen == [("/dev/loop3", "/mnt/x", 1024)]
    assert runner.argvs() == []


async def test_fstool_falls_back_to_resize2fs_without_the_ioctl(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    _capable(monkeypatch, data_dir)
    monkeypatch.setattr(fs, "grow_mounted", lambda dev, mnt, head, size: None)
    runner = FakeRunner()
    await FsTool(runner).grow("ext4", "/dev/loop3", "/mnt/x")  # type: ignore[arg-type]
    assert runner.argvs() == [("resize2fs", "/dev/loop3")]


async def test_fstool_without_cap_sys_resource_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fs, "has_capability", lambda cap: False)
    monkeypatch.setattr(fs, "grow_mounted", lambda *a: pytest.fail("must not try"))
    with pytest.raises(FailedPrecondition, match="CAP_SYS_RESOURCE"):
        await FsTool(FakeRunner()).grow("ext4", "/dev/loop3", "/mnt/x")  # type: ignore[arg-type]


def test_the_ioctl_number() -> None:
    # _IOW('f', 16, __u64): direction write (1) << 30 | size 8 << 16 | 'f' << 8 | 16.
    assert (1 << 30) | (8 << 16) | (ord("f") << 8) | 16 == ext4resize.EXT4_IOC_RESIZE_FS
