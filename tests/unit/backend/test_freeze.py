"""The shared freeze helper: markers name what is frozen, thaw runs in
reverse even on failure, and startup thaws what a dead process left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from csi.backend import freeze
from csi.errors import CommandError
from csi.host import procs


class FakeFs:
    def __init__(self, fail_freeze: str = "") -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_freeze = fail_freeze

    async def freeze(self, mp: str) -> None:
        if mp == self.fail_freeze:
            raise CommandError(["fsfreeze"], 1, b"", b"nope")
        self.calls.append(("freeze", mp))

    async def thaw(self, mp: str) -> None:
        self.calls.append(("thaw", mp))


async def test_freeze_and_thaw_in_order(tmp_path: Path) -> None:
    fs: Any = FakeFs()
    async with freeze.frozen(fs, ["/a", "/b"], str(tmp_path), "t"):
        assert len(list(tmp_path.glob("*.frozen"))) == 2
    assert fs.calls == [("freeze", "/a"), ("freeze", "/b"), ("thaw", "/b"), ("thaw", "/a")]
    assert list(tmp_path.iterdir()) == []


async def test_nothing_to_freeze_makes_no_marker_dir(tmp_path: Path) -> None:
    fs: Any = FakeFs()
    ran = False
    async with freeze.frozen(fs, [], str(tmp_path / "markers"), "t"):
        ran = True
    assert ran and fs.calls == []
    assert not (tmp_path / "markers").exists()


async def test_a_failed_freeze_thaws_the_others(tmp_path: Path) -> None:
    fs: Any = FakeFs(fail_freeze="/b")
    with pytest.raises(CommandError):
        async with freeze.frozen(fs, ["/a", "/b"], str(tmp_path), "t"):
            pass
    assert fs.calls == [("freeze", "/a"), ("thaw", "/a")]
    assert list(tmp_path.iterdir()) == []


async def test_thaw_leftovers(tmp_path: Path) -> None:
    (tmp_path / "x-1-0.frozen").write_text('{"mount_point": "/left"}')
    (tmp_path / "x-1-1.frozen").write_text("garbage")
    (tmp_path / "x-1-2.frozen.tmp").write_text("")
    fs: Any = FakeFs()
    assert await freeze.thaw_leftovers(fs, str(tmp_path)) == ["/left"]
    assert fs.calls == [("thaw", "/left")]
    assert list(tmp_path.iterdir()) == []
    assert await freeze.thaw_leftovers(fs, str(tmp_path / "none")) == []


async def test_thaw_leftovers_leaves_a_live_process_s_markers_alone(tmp_path: Path) -> None:
    # Another driver sharing the directory is mid-way through its own group
    # snapshot: thawing its members would break the group's point in time.
    live = procs.token().replace(" ", "_")
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = procs.token(os.getpid()).split()[1]  # a start time that the dead pid no longer has
    (tmp_path / f"lvm-group-{live}-0.frozen").write_text('{"mount_point": "/busy"}')
    (tmp_path / f"lvm-group-{live}-1.frozen.tmp").write_text('{"mount_')
    (tmp_path / f"lvm-group-{p.pid}_{dead}-0.frozen").write_text('{"mount_point": "/left"}')
    (tmp_path / "image.tmp").write_text("not a marker")
    fs: Any = FakeFs()
    assert await freeze.thaw_leftovers(fs, str(tmp_path)) == ["/left"]
    assert fs.calls == [("thaw", "/left")]
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(
        [f"lvm-group-{live}-0.frozen", f"lvm-group-{live}-1.frozen.tmp", "image.tmp"]
    )


async def test_markers_name_their_owner(tmp_path: Path) -> None:
    fs: Any = FakeFs()
    async with freeze.frozen(fs, ["/a"], str(tmp_path), "lvm-group"):
        (marker,) = tmp_path.iterdir()
        assert marker.name == f"lvm-group-{procs.token().replace(' ', '_')}-0.frozen"
        # While we hold it, a restarting peer's recovery leaves it be.
        assert await freeze.thaw_leftovers(FakeFs(), str(tmp_path)) == []  # type: ignore[arg-type]
        assert marker.exists()
