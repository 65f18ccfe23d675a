"""csi.host.loop without loop devices: captured losetup output and a fake sysfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi.errors import CommandError, Internal
from csi.host import loop
from csi.host.loop import LoopDevice, LoopTool, parse_backing_file, parse_losetup_json
from tests.support.fakes import FakeRunner


def test_parse_losetup_json_sample(data_dir: Path) -> None:
    devs = parse_losetup_json((data_dir / "losetup-list.json").read_text())
    assert devs == [
        LoopDevice("loop1", "/tmp/elvcap/b img.img", deleted=False, direct_io=True),
        LoopDevice("loop2", "/tmp/elvcap/c.img", deleted=True, direct_io=False),
        LoopDevice("loop0", "/tmp/elvcap/a.img", deleted=False, direct_io=False),
    ]
    assert devs[0].path == "/dev/loop1"


def test_parse_losetup_json_empty(data_dir: Path) -> None:
    assert parse_losetup_json((data_dir / "losetup-list-empty.json").read_text()) == []
    # Older util-linux prints nothing at all when no device is attached.
    assert parse_losetup_json("") == []
    assert parse_losetup_json("\n") == []


def test_parse_losetup_json_without_optional_fields() -> None:
    devs = parse_losetup_json('{"loopdevices": [{"name": "/dev/loop7", "back-file": null}]}')
    assert devs == [LoopDevice("loop7", "", False, None)]


def test_parse_losetup_json_refuses_garbage() -> None:
    with pytest.raises(ValueError):  # json.JSONDecodeError is a ValueError
        parse_losetup_json("losetup: cannot find an unused loop device")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/pool/volumes/v-loop-1.img\n", ("/pool/volumes/v-loop-1.img", False)),
        ("/pool/volumes/v-loop-1.img (deleted)\n", ("/pool/volumes/v-loop-1.img", True)),
        ("/pool/a (deleted) b.img\n", ("/pool/a (deleted) b.img", False)),
        ("/p/x.img", ("/p/x.img", False)),
    ],
)
def test_parse_backing_file(raw: str, expected: tuple[str, bool]) -> None:
    assert parse_backing_file(raw) == expected


def make_sysfs(root: Path, devices: dict[str, str | None]) -> Path:
    """A /sys/block look-alike: name -> backing_file text (None: not attached)."""
    for name, back in devices.items():
        d = root / name
        d.mkdir(parents=True)
        (d / "size").write_text("2097152\n")
        if back is not None:
            (d / "loop").mkdir()
            (d / "loop" / "backing_file").write_text(back + "\n")
            (d / "loop" / "dio").write_text("1\n" if name == "loop10" else "0\n")
    return root


def test_scan_reads_sysfs(tmp_path: Path) -> None:
    sysfs = make_sysfs(
        tmp_path / "block",
        {
            "loop10": "/pool/volumes/b.img",
            "loop2": "/pool/volumes/a.img",
            "loop3": "/pool/volumes/a.img (deleted)",
            "loop4": None,  # exists, nothing attached
            "sda": None,
            "loopback": None,
        },
    )
    (sysfs / "nvme0n1").mkdir()
    devs = loop.scan(str(sysfs))
    # Sorted numerically (loop10 after loop3), unattached and non-loop devices skipped.
    assert devs == [
        LoopDevice("loop2", "/pool/volumes/a.img", False, False),
        LoopDevice("loop3", "/pool/volumes/a.img", True, False),
        LoopDevice("loop10", "/pool/volumes/b.img", False, True),
    ]


def test_find_ignores_deleted_backing_files(tmp_path: Path) -> None:
    sysfs = make_sysfs(tmp_path / "block", {"loop2": "/p/a.img (deleted)", "loop5": "/p/a.img", "loop6": "/p/b.img"})
    assert [d.name for d in loop.find("/p/a.img", str(sysfs))] == ["loop5"]
    assert loop.find("/p/c.img", str(sysfs)) == []
    assert loop.scan(str(tmp_path / "missing")) == []


def test_size_bytes(tmp_path: Path) -> None:
    sysfs = make_sysfs(tmp_path / "block", {"loop1": "/p/a.img"})
    assert loop.size_bytes("loop1", str(sysfs)) == 2097152 * 512


async def test_attach_reuses_an_existing_device(tmp_path: Path) -> None:
    sysfs = make_sysfs(tmp_path / "block", {"loop5": "/p/a.img"})
    runner = FakeRunner()
    tool = LoopTool(runner, sys_block=str(sysfs), use_ioctl=False)  # type: ignore[arg-type]
    tool.seed()  # the driver indexes attached devices at startup
    dev = await tool.attach("/p/a.img")
    assert dev.name == "loop5"
    assert runner.calls == []


async def test_the_index_is_checked_against_sysfs(tmp_path: Path) -> None:
    sysfs = make_sysfs(tmp_path / "block", {"loop5": "/p/a.img"})
    tool = LoopTool(FakeRunner(), sys_block=str(sysfs), use_ioctl=False)  # type: ignore[arg-type]
    tool.seed()
    assert tool.lookup("/p/a.img") is not None
    (sysfs / "loop5" / "loop" / "backing_file").write_text("/p/other.img\n")  # detached and reused behind our back
    assert tool.lookup("/p/a.img") is None
    assert tool.find_all("/p/other.img")[0].name == "loop5"


async def test_a_device_attached_from_a_gone_mount_is_found_by_its_file(tmp_path: Path) -> None:
    """After the node plugin's container restarts, the kernel shows the files its
    predecessor attached relative to the mount they were opened through (gone
    with that container): /loop/volumes/a.img for POOL/loop/volumes/a.img. The
    file is the same (device and inode), and the driver must know it attached."""
    image = tmp_path / "pool" / "loop" / "volumes" / "a.img"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"")
    other = tmp_path / "pool" / "loop" / "volumes" / "b.img"
    other.write_bytes(b"")
    sysfs = make_sysfs(tmp_path / "block", {"loop5": "/loop/volumes/a.img", "loop6": "/loop/volumes/c.img"})
    idents = {"loop5": loop.file_identity(str(image)), "loop6": (7, 7, 7)}
    runner = FakeRunner()
    tool = LoopTool(runner, sys_block=str(sysfs), use_ioctl=False, identity=idents.get)  # type: ignore[arg-type]
    tool.seed()
    dev = await tool.attach(str(image))  # a restage: the same device, never a second one
    assert dev.name == "loop5" and runner.calls == []
    assert tool.lookup(str(image)) is not None
    assert [d.name for d in tool.find_all(str(image))] == ["loop5"]
    assert [d.name for d in loop.find(str(image), str(sysfs), idents.get)] == ["loop5"]
    # Another file of the same name elsewhere is not it.
    assert tool.lookup(str(other)) is None and tool.find_all(str(other)) == []
    # Detached behind our back: no longer found.
    idents["loop5"] = None
    (sysfs / "loop5" / "loop" / "backing_file").write_text("/loop/volumes/a.img (deleted)\n")
    assert tool.lookup(str(image)) is None


async def test_attach_runs_losetup_with_safe_arguments(tmp_path: Path) -> None:
    sysfs = tmp_path / "block"
    sysfs.mkdir()

    class AttachingRunner(FakeRunner):
        async def run(self, argv, **kw):  # type: ignore[no-untyped-def]
            make_sysfs(sysfs, {"loop9": argv[-1]})
            return await super().run(argv, **kw)

    runner = AttachingRunner({"losetup": (0, b"/dev/loop9\n", b"")})
    dev = await LoopTool(runner, sys_block=str(sysfs), use_ioctl=False).attach("-rf.img")  # type: ignore[arg-type]
    assert dev.name == "loop9"
    (argv,) = runner.argvs()
    assert argv == ("losetup", "--find", "--show", "--nooverlap", "--direct-io=on", "--", "-rf.img")


async def test_a_read_only_view_runs_losetup_read_only_and_buffered(tmp_path: Path) -> None:
    runner = FakeRunner({"losetup": (0, b"/dev/loop12\n", b"")})
    tool = LoopTool(runner, sys_block=str(tmp_path), use_ioctl=False)  # type: ignore[arg-type]
    assert await tool.attach_read_only("/dev/loop3", 4096) == "loop12"
    (argv,) = runner.argvs()
    # Never --nooverlap (it would hand back a writable device over the same file), never direct I/O.
    assert argv == ("losetup", "--find", "--show", "--read-only", "--sector-size=4096", "--", "/dev/loop3")


def test_read_only_and_block_size_from_sysfs(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {"loop12": "/dev/loop3", "loop3": "/pool/a.img"})
    (tmp_path / "loop12" / "ro").write_text("1\n")
    (tmp_path / "loop3" / "ro").write_text("0\n")
    (tmp_path / "loop3" / "queue").mkdir()
    (tmp_path / "loop3" / "queue" / "logical_block_size").write_text("4096\n")
    assert loop.read_only("loop12", str(tmp_path)) is True
    assert loop.read_only("loop3", str(tmp_path)) is False
    assert loop.read_only("loop99", str(tmp_path)) is False
    assert loop.logical_block_size("loop3", str(tmp_path)) == 4096


async def test_attach_refuses_an_unexpected_device_name(tmp_path: Path) -> None:
    runner = FakeRunner({"losetup": (0, b"/dev/sda\n", b"")})
    tool = LoopTool(runner, direct_io=False, sys_block=str(tmp_path), use_ioctl=False)  # type: ignore[arg-type]
    with pytest.raises(Internal, match="unexpected device name"):
        await tool.attach("/p/a.img")
    assert "--direct-io=on" not in runner.argvs()[0]


async def test_detach_validates_the_name_and_tolerates_already_gone(tmp_path: Path) -> None:
    runner = FakeRunner({"losetup": (1, b"", b"losetup: /dev/loop3: detach failed: No such device or address")})
    tool = LoopTool(runner, sys_block=str(tmp_path), use_ioctl=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a loop device"):
        await tool.detach("../sda")
    assert runner.calls == []
    await tool.detach("loop3")  # not in (fake) sysfs: already gone is fine
    make_sysfs(tmp_path, {"loop4": "/p/a.img"})
    with pytest.raises(CommandError):
        await tool.detach("loop4")  # still attached: the failure is real


def test_partitions_name_only_attached_loop_devices() -> None:
    from csi.host.loop import parse_partitions

    text = """major minor  #blocks  name

 254        0  268435456 vda
   7        0      65536 loop0
   7        3     327680 loop3
   7        4      65536 loop3p1
 252        0   12582912 zram0
"""
    assert parse_partitions(text) == ["loop0", "loop3"]


async def test_a_detached_device_taken_by_another_file_is_detached_from_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel frees a device at its last close, and another process may attach
    it to its own file at once: the detach of ours is done, not "still attached"."""
    sysfs = make_sysfs(tmp_path / "block", {"loop6": "/p/ours.img"})
    tool = LoopTool(FakeRunner(), sys_block=str(sysfs), use_ioctl=True)  # type: ignore[arg-type]
    backing = sysfs / "loop6" / "loop" / "backing_file"
    monkeypatch.setattr(loop.loopctl, "detach", lambda name: backing.write_text("/q/someone-elses.img\n"))
    monkeypatch.setattr(loop, "discards_stopped", lambda name, sys_block: False)
    await tool.detach("loop6")
    # Still holding our file after the deadline: that is a holder, and an error.
    backing.write_text("/p/ours.img\n")
    monkeypatch.setattr(loop.loopctl, "detach", lambda name: None)
    with pytest.raises(Internal, match="still attached"):
        await tool._wait_detached("loop6", "/p/ours.img\n", timeout=0.05)
