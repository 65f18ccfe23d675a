"""Changes made by the resident lvm shell for changes (csi.backend.lvm.changes),
against the fake shell (tests/support/fake_lvm_shell.py). A change there must
keep every rule a change run as its own process keeps: never killed because
its caller went away, waited for at shutdown, journaled, never run twice."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from csi.backend.lvm.changes import ChangeShell, never_prompts
from csi.backend.lvm.command import Lvm
from csi.errors import CommandError, CommandTimeout, Unavailable
from csi.host.runner import Runner
from tests.unit.backend_lvm.test_lvm_shell import FAKE, lines, pids
from tests.unit.host.test_runner import gone, wait_until


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["lvcreate", "-n", "a", "-L", "8m", "-y", "vg"], True),
        (["lvremove", "--yes", "vg/a"], True),
        (["lvchange", "--config", "x{y=0}", "--addtag", "elv.a=1", "--deltag", "elv.b", "vg/a"], True),
        (["lvchange", "-an", "vg/a"], False),  # a COW snapshot would ask first
        (["lvchange", "-ay", "-K", "vg/a"], False),
        (["lvchange", "--errorwhenfull", "y", "vg/pool"], False),
        (["lvchange", "vg/a"], False),  # nothing to change: LVM's own answer
        (["lvrename", "vg", "a", "b"], False),
        (["lvextend", "-L", "16m", "vg/a"], False),
        ([], False),
    ],
)
def test_only_commands_that_cannot_stop_at_a_question_go_to_the_shell(args: list[str], expected: bool) -> None:
    assert never_prompts(args) is expected


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "record"


@pytest.fixture
def own(tmp_path: Path) -> Path:
    """What ran as its own ``lvm`` process (a script that records its argv)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "lvm"
    script.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/own\n')
    script.chmod(0o755)
    return tmp_path / "own"


@pytest.fixture
async def runner(tmp_path: Path, own: Path) -> AsyncIterator[Runner]:
    (tmp_path / "journal").mkdir()  # the driver's start-up makes it (wait_for_orphans)
    r = Runner(search_path=str(tmp_path / "bin"), journal_dir=str(tmp_path / "journal"))
    try:
        yield r
    finally:
        await r.close(5)


@pytest.fixture
def ch(runner: Runner, record: Path) -> ChangeShell:
    return ChangeShell(runner, str(record.parent / "home"), argv=(sys.executable, FAKE, str(record)))


@pytest.fixture
def lvm(runner: Runner, ch: ChangeShell) -> Lvm:
    return Lvm(runner, udev=True, changes=ch)


def own_lines(own: Path) -> list[str]:
    return own.read_text().splitlines() if own.exists() else []


async def test_changes_that_cannot_prompt_share_one_shell_and_the_rest_run_on_their_own(
    lvm: Lvm, record: Path, own: Path
) -> None:
    await lvm.change("lvchange", "--addtag", "elv.a=1", "vg/a")
    await lvm.change("lvremove", "-y", "vg/a")
    await lvm.change("lvchange", "-an", "vg/b")
    assert lines(record) == ["lvchange --addtag elv.a=1 vg/a", "lvremove -y vg/a"]
    assert len(pids(record)) == 1
    assert own_lines(own) == ["lvchange -an vg/b"]


async def test_a_failed_change_raises_with_the_shells_messages(lvm: Lvm, own: Path) -> None:
    with pytest.raises(CommandError) as e:
        await lvm.change("lvremove", "-y", "missingvg/a")
    assert e.value.returncode == 5 and b'Volume group "missingvg/a" not found' in e.value.stderr
    assert own_lines(own) == []  # not run again on its own


async def test_a_caller_that_goes_away_leaves_its_change_running(
    lvm: Lvm, ch: ChangeShell, record: Path, runner: Runner
) -> None:
    task = asyncio.ensure_future(lvm.change("slow", "-y"))
    assert await wait_until(lambda: record.exists() and "slow -y" in lines(record))
    pid = pids(record)[0]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not gone(pid) and runner.running == 1
    assert await wait_until(lambda: "done slow" in lines(record))
    assert await wait_until(lambda: runner.running == 0)
    await lvm.change("lvremove", "-y", "vg/a")
    assert pids(record) == [pid]  # the same shell, never killed


async def test_while_the_shell_is_busy_a_change_runs_on_its_own(lvm: Lvm, record: Path, own: Path) -> None:
    slow = asyncio.ensure_future(lvm.change("slow", "-y"))
    assert await wait_until(lambda: record.exists() and "slow -y" in lines(record))
    await lvm.change("lvremove", "-y", "vg/b")
    assert own_lines(own) == ["lvremove -y vg/b"] and "done slow" not in lines(record)
    await slow


async def test_a_change_whose_answer_is_lost_is_never_run_again(lvm: Lvm, record: Path, own: Path) -> None:
    with pytest.raises(Unavailable, match="not run again"):
        await lvm.change("die", "-y")
    assert lines(record) == ["die -y"] and own_lines(own) == []


async def test_a_change_that_times_out_kills_the_shell(lvm: Lvm, record: Path, tmp_path: Path) -> None:
    with pytest.raises(CommandTimeout):
        await lvm.change("hang", "-y", timeout=0.5)
    assert gone(pids(record)[0])
    assert os.listdir(tmp_path / "journal") == []


async def test_the_shell_is_journaled_while_it_lives(lvm: Lvm, record: Path, runner: Runner, tmp_path: Path) -> None:
    """A successor of a killed driver waits for the shell's last change."""
    await lvm.change("lvremove", "-y", "vg/a")
    pid = pids(record)[0]
    (entry,) = os.listdir(tmp_path / "journal")
    assert entry == f"{pid}.json"
    assert json.loads((tmp_path / "journal" / entry).read_text())["argv"][1] == FAKE
    await runner.close(5)
    assert gone(pid) and os.listdir(tmp_path / "journal") == []


async def test_shutdown_waits_for_a_change_in_the_shell(lvm: Lvm, record: Path, runner: Runner) -> None:
    task = asyncio.ensure_future(lvm.change("slow", "-y"))
    assert await wait_until(lambda: record.exists() and "slow -y" in lines(record))
    assert await runner.close(5) == 0  # nothing had to be killed
    assert "done slow" in lines(record) and gone(pids(record)[0])
    assert (await task).returncode == 0
