"""Thick volumes' devices never free blocks of their file: csi.host.loop's
discard switch, on a fake sysfs (the real kernel's behaviour is measured by
tests/integration/test_thick.py)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from csi.errors import FailedPrecondition
from csi.host import loop, loopctl
from csi.host.loop import LoopTool
from tests.support.fakes import FakeRunner

HW = "4294966784"


def queue(sysfs: Path, name: str, *, limit: str = HW, unmap: str | None = "0", back: str | None = None) -> Path:
    q = sysfs / name / "queue"
    q.mkdir(parents=True)
    (q / "discard_max_bytes").write_text(limit + "\n")
    (q / "discard_max_hw_bytes").write_text(HW + "\n")
    if unmap is not None:
        (q / "write_zeroes_unmap_max_bytes").write_text(unmap + "\n")
    if back is not None:
        (sysfs / name / "loop").mkdir()
        (sysfs / name / "loop" / "backing_file").write_text(back + "\n")
    (sysfs / name / "size").write_text("131072\n")
    return q


def test_stop_discards_zeroes_both_limits_and_is_idempotent(tmp_path: Path) -> None:
    q = queue(tmp_path, "loop3", unmap="4096")
    assert not loop.discards_stopped("loop3", str(tmp_path))
    loop.stop_discards("loop3", str(tmp_path))
    assert (q / "discard_max_bytes").read_text() == "0"
    assert (q / "write_zeroes_unmap_max_bytes").read_text() == "0"
    assert loop.discards_stopped("loop3", str(tmp_path))
    (q / "discard_max_bytes").chmod(0o444)  # a second call writes nothing
    loop.stop_discards("loop3", str(tmp_path))


def test_kernels_without_the_unmap_limit_need_only_discard(tmp_path: Path) -> None:
    q = queue(tmp_path, "loop4", unmap=None)
    loop.stop_discards("loop4", str(tmp_path))
    assert (q / "discard_max_bytes").read_text() == "0"
    assert not (q / "write_zeroes_unmap_max_bytes").exists()


def test_a_device_that_cannot_discard_anyway_is_not_stopped(tmp_path: Path) -> None:
    q = queue(tmp_path, "loop5", limit="0")
    (q / "discard_max_hw_bytes").write_text("0\n")  # e.g. a pool filesystem without hole punching
    assert not loop.discards_stopped("loop5", str(tmp_path))
    assert not loop.discards_stopped("loop6", str(tmp_path))  # no such device


def test_a_read_only_sysfs_is_a_clear_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    queue(tmp_path, "loop3")
    real_open = open

    def no_write(path: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
        if "w" in mode:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", no_write)
    with pytest.raises(FailedPrecondition, match="writable /sys"):
        loop.stop_discards("loop3", str(tmp_path))


def test_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a loop device"):
        loop.stop_discards("../sda", str(tmp_path))


async def test_attach_without_discards_stops_them_on_new_and_found_devices(tmp_path: Path) -> None:
    class AttachingRunner(FakeRunner):
        async def run(self, argv, **kw):  # type: ignore[no-untyped-def]
            if argv[0] == "losetup":
                queue(tmp_path, "loop9", back=argv[-1])
            return await super().run(argv, **kw)

    tool = LoopTool(AttachingRunner({"losetup": (0, b"/dev/loop9\n", b"")}), sys_block=str(tmp_path), use_ioctl=False)  # type: ignore[arg-type]
    dev = await tool.attach("/p/thick.img", discards=False)
    assert dev.name == "loop9" and loop.discards_stopped("loop9", str(tmp_path))
    # Found attached (a driver before this one let it discard): stopped again.
    (tmp_path / "loop9" / "queue" / "discard_max_bytes").write_text(HW)
    assert (await tool.attach("/p/thick.img", discards=False)).name == "loop9"
    assert loop.discards_stopped("loop9", str(tmp_path))


async def test_a_thin_attach_leaves_discards_alone(tmp_path: Path) -> None:
    queue(tmp_path, "loop2", back="/p/thin.img")
    tool = LoopTool(FakeRunner(), sys_block=str(tmp_path), use_ioctl=False)  # type: ignore[arg-type]
    tool.seed()
    await tool.attach("/p/thin.img")
    assert not loop.discards_stopped("loop2", str(tmp_path))


async def test_detach_removes_a_device_whose_discards_were_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    removed: list[int] = []
    monkeypatch.setattr(loopctl, "remove", lambda n: removed.append(n) or True)
    queue(tmp_path, "loop7", limit="0")  # detached already (no loop/ dir): losetup says so, and that is fine
    queue(tmp_path, "loop8")
    runner = FakeRunner({"losetup": (1, b"", b"losetup: detach failed: No such device or address")})
    tool = LoopTool(runner, sys_block=str(tmp_path), use_ioctl=False)  # type: ignore[arg-type]
    await tool.detach("loop7")
    await tool.detach("loop8")
    assert removed == [7], "only the device that can no longer discard goes"


def test_get_free_passes_over_a_device_to_avoid(monkeypatch: pytest.MonkeyPatch) -> None:
    free = [0, 0, 1]
    calls: list[tuple[str, int]] = []

    def ioctl(fd: int, op: int, arg: Any = 0) -> int:
        if op == loopctl.LOOP_CTL_GET_FREE:
            return free.pop(0)
        if op == loopctl.LOOP_CTL_REMOVE:
            calls.append(("remove", arg))
            return 0
        if op == loopctl.LOOP_CONFIGURE:
            calls.append(("configure", fd))
            return 0
        raise AssertionError(op)

    monkeypatch.setattr(loopctl.fcntl, "ioctl", ioctl)

    def fake_open(path: str, flags: int) -> int:
        return {"/dev/loop-control": 100, "/f.img": 101}.get(path) or 200 + int(path.removeprefix("/dev/loop"))

    monkeypatch.setattr(loopctl.os, "open", fake_open)
    monkeypatch.setattr(loopctl.os, "close", lambda fd: None)
    # The first free device is avoided and removed. GET_FREE may offer the
    # number again (a new device, or the removal raced an attach elsewhere):
    # it is never passed over twice, so an attach always ends.
    assert loopctl.attach("/f.img", avoid=lambda n: n == 0) == "loop0"
    assert calls == [("remove", 0), ("configure", 200)]
    calls.clear()
    free[:] = [0, 1]
    assert loopctl.attach("/f.img", avoid=lambda n: n == 0) == "loop1"
    assert calls == [("remove", 0), ("configure", 201)]
