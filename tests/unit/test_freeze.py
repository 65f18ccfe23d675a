"""The shared freeze helper: markers name what is frozen, thaw runs in
reverse even on failure, and startup thaws what a dead process left."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from csi.backend import freeze
from csi.errors import CommandError


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
