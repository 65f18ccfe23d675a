"""csi.host.fs on captured blkid output and superblocks; commands go to a fake runner."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from csi.errors import FailedPrecondition, InvalidArgument
from csi.host import fs
from csi.host.fs import FsTool, Probe, ext4_size, parse_blkid_export, xfs_size
from tests.support.fakes import FakeRunner

MiB = 1024 * 1024


def blkid(data_dir: Path, name: str) -> bytes:
    return (data_dir / f"blkid-{name}.txt").read_bytes()


def test_parse_blkid_ext4(data_dir: Path) -> None:
    f = parse_blkid_export(blkid(data_dir, "ext4").decode())
    assert f["TYPE"] == "ext4"
    assert f["USAGE"] == "filesystem"
    assert f["BLOCK_SIZE"] == "1024"
    assert f["DEVNAME"] == "/dev/loop0"
    assert len(f["UUID"]) == 36


def test_parse_blkid_xfs(data_dir: Path) -> None:
    f = parse_blkid_export(blkid(data_dir, "xfs").decode())
    assert f["TYPE"] == "xfs"
    assert f["BLOCK_SIZE"] == "512"


def test_parse_blkid_partition_table(data_dir: Path) -> None:
    f = parse_blkid_export(blkid(data_dir, "dos-pttable").decode())
    assert f == {"DEVNAME": "/dev/loop0", "PTUUID": "1a2b3c4d", "PTTYPE": "dos"}
    assert "TYPE" not in f


def test_parse_blkid_odd_lines() -> None:
    assert parse_blkid_export("") == {}
    assert parse_blkid_export("noise\nLABEL=a=b\n") == {"LABEL": "a=b"}


async def test_probe_blank_device(data_dir: Path) -> None:
    runner = FakeRunner({"blkid": (2, blkid(data_dir, "blank"), b"")})
    probe = await FsTool(runner).probe("/dev/loop3")  # type: ignore[arg-type]
    assert probe == Probe(True, None, {})
    ((argv, kw),) = runner.called("run")
    assert argv == ("blkid", "-p", "-o", "export", "--", "/dev/loop3")
    assert kw["mutating"] is False
    assert 2 in kw["ok_codes"]


@pytest.mark.parametrize(("sample", "fstype"), [("ext4", "ext4"), ("xfs", "xfs")])
async def test_probe_filesystems(data_dir: Path, sample: str, fstype: str) -> None:
    runner = FakeRunner({"blkid": (0, blkid(data_dir, sample), b"")})
    probe = await FsTool(runner).probe("/dev/loop0")  # type: ignore[arg-type]
    assert not probe.blank
    assert probe.fstype == fstype


async def test_probe_partition_table_is_not_blank(data_dir: Path) -> None:
    runner = FakeRunner({"blkid": (0, blkid(data_dir, "dos-pttable"), b"")})
    probe = await FsTool(runner).probe("/dev/loop0")  # type: ignore[arg-type]
    assert not probe.blank
    assert probe.fstype is None
    assert probe.fields["PTTYPE"] == "dos"


async def test_mkfs_never_forces() -> None:
    runner = FakeRunner()
    tool = FsTool(runner, xfs_config="/etc/elv/lts_6.1.conf")  # type: ignore[arg-type]
    await tool.mkfs("/dev/loop3", "ext4")
    await tool.mkfs("/dev/loop4", "xfs")
    ext4, xfs = runner.argvs()
    assert ext4[0] == "mkfs.ext4"
    assert ext4[-2:] == ("--", "/dev/loop3")
    assert "nodiscard" in " ".join(ext4)
    assert xfs[0] == "mkfs.xfs"
    assert xfs[-1] == "/dev/loop4"
    assert xfs[xfs.index("-c") : xfs.index("-c") + 2] == ("-c", "options=/etc/elv/lts_6.1.conf")
    for argv in (ext4, xfs):
        assert "-F" not in argv
        assert "-f" not in argv
        assert "--force" not in argv
    with pytest.raises(InvalidArgument, match="unsupported filesystem"):
        await tool.mkfs("/dev/loop3", "btrfs")


async def test_mkfs_force_is_explicit() -> None:
    runner = FakeRunner()
    tool = FsTool(runner)  # type: ignore[arg-type]
    await tool.mkfs("/dev/loop3", "ext4", force=True)
    await tool.mkfs("/dev/loop4", "xfs", force=True)
    ext4, xfs = runner.argvs()
    assert "-F" in ext4
    assert ext4[-2:] == ("--", "/dev/loop3")
    assert "-f" in xfs
    assert xfs[-1] == "/dev/loop4"


async def test_grow_offline_refuses_unrepaired_errors() -> None:
    runner = FakeRunner({"e2fsck": (4, b"", b"")})
    with pytest.raises(FailedPrecondition, match="repair the volume by hand"):
        await FsTool(runner).grow_offline("ext4", "/dev/loop3")  # type: ignore[arg-type]
    assert [a[0] for a in runner.argvs()] == ["e2fsck"]
    ok = FakeRunner({"e2fsck": (1, b"", b"")})
    await FsTool(ok).grow_offline("ext4", "/dev/loop3")  # type: ignore[arg-type]
    assert [a[0] for a in ok.argvs()] == ["e2fsck", "resize2fs"]
    with pytest.raises(InvalidArgument):
        await FsTool(ok).grow_offline("xfs", "/dev/loop3")  # type: ignore[arg-type]


async def test_grow_xfs_failure_is_a_failed_precondition() -> None:
    runner = FakeRunner({"xfs_growfs": (1, b"", b"xfs_growfs: XFS_IOC_FSGROWFSDATA xfsctl failed")})
    with pytest.raises(FailedPrecondition, match="growing the xfs filesystem failed"):
        await FsTool(runner).grow("xfs", "/dev/loop3", "/mnt/x")  # type: ignore[arg-type]
    assert runner.argvs() == [("xfs_growfs", "-d", "/mnt/x")]


# -- superblocks ---------------------------------------------------------------------------


def sb(data_dir: Path, name: str) -> bytes:
    data = (data_dir / name).read_bytes()
    assert len(data) == 4096
    return data


def test_ext4_size_64bit(data_dir: Path) -> None:
    data = sb(data_dir, "ext4-64bit-16MiB.sb")
    assert struct.unpack_from("<I", data, 1024 + 0x60)[0] & 0x80, "the sample should have the 64bit feature"
    assert ext4_size(data[1024:2048]) == 16 * MiB


def test_ext4_size_32bit_4k_blocks(data_dir: Path) -> None:
    data = sb(data_dir, "ext4-32bit-20MiB.sb")
    assert not struct.unpack_from("<I", data, 1024 + 0x60)[0] & 0x80
    assert ext4_size(data[1024:2048]) == 20 * MiB


def test_ext4_size_uses_the_high_block_count_only_with_64bit(data_dir: Path) -> None:
    big = bytearray(sb(data_dir, "ext4-64bit-16MiB.sb")[1024:2048])
    struct.pack_into("<I", big, 0x150, 3)
    assert ext4_size(bytes(big)) == ((3 << 32) + 16384) * 1024
    small = bytearray(sb(data_dir, "ext4-32bit-20MiB.sb")[1024:2048])
    struct.pack_into("<I", small, 0x150, 3)  # garbage where a 32-bit fs has no high word
    assert ext4_size(bytes(small)) == 20 * MiB


def test_xfs_size(data_dir: Path) -> None:
    data = sb(data_dir, "xfs-300MiB.sb")
    assert xfs_size(data[:512]) == 300 * MiB
    assert xfs_size(data) == 300 * MiB


def test_superblock_types_do_not_mix(data_dir: Path) -> None:
    ext4 = sb(data_dir, "ext4-64bit-16MiB.sb")
    xfs = sb(data_dir, "xfs-300MiB.sb")
    assert ext4_size(xfs[1024:2048]) is None
    assert xfs_size(ext4[:512]) is None
    assert ext4_size(ext4[:1024]) is None  # wrong offset: no magic there
    assert ext4_size(ext4[1024:1100]) is None  # too short
    assert xfs_size(b"XFSB") is None
    assert ext4_size(bytes(1024)) is None
    assert xfs_size(bytes(512)) is None


@pytest.mark.parametrize(
    ("name", "fstype", "size"),
    [
        ("ext4-64bit-16MiB.sb", "ext4", 16 * MiB),
        ("ext4-32bit-20MiB.sb", "ext4", 20 * MiB),
        ("xfs-300MiB.sb", "xfs", 300 * MiB),
    ],
)
def test_read_fs_size_reads_the_right_offset(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, fstype: str, size: int
) -> None:
    img = tmp_path / "dev"
    img.write_bytes(sb(data_dir, name))
    # O_DIRECT is not supported on every filesystem tmp_path may live on (tmpfs).
    monkeypatch.setattr(os, "O_DIRECT", 0)
    assert fs.read_fs_size(str(img), fstype) == size
    assert fs.read_fs_size(str(img), "btrfs") is None
    other = "xfs" if fstype == "ext4" else "ext4"
    assert fs.read_fs_size(str(img), other) is None


def test_device_size_of_a_file(tmp_path: Path) -> None:
    f = tmp_path / "img"
    with open(f, "wb") as out:
        out.truncate(5 * MiB + 512)
    assert fs.device_size(str(f)) == 5 * MiB + 512


def test_has_capability(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t0000000001000000\n")
    assert fs.has_capability(fs.CAP_SYS_RESOURCE, str(status))  # bit 24
    assert not fs.has_capability(21, str(status))
    status.write_text("Name:\tpython\nCapEff:\t0000000000000000\n")
    assert not fs.has_capability(fs.CAP_SYS_RESOURCE, str(status))
    status.write_text("Name:\tpython\n")
    assert not fs.has_capability(fs.CAP_SYS_RESOURCE, str(status))
