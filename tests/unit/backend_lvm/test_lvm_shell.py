"""The resident ``lvm shell`` for reports: the protocol on a captured stream,
and the process's life against a fake shell (tests/support/fake_lvm_shell.py)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from csi.backend.lvm import shell as shell_mod
from csi.backend.lvm.command import Lvm
from csi.backend.lvm.shell import Framer, LvmShell, ProtocolError, exit_status, messages, shell_line
from csi.errors import CommandError, CommandTimeout
from csi.host.runner import Runner
from tests.support.paths import REPO
from tests.unit.host.test_runner import gone, wait_until

STREAM = (Path(REPO) / "tests/data/lvm/shell-report-stream.txt").read_bytes()
FAKE = str(Path(REPO) / "tests/support/fake_lvm_shell.py")


# -- the protocol, on what a real lvm shell wrote -----------------------------


def test_the_captured_stream_splits_into_one_document_per_command_whatever_the_chunks() -> None:
    whole = Framer().feed(STREAM)
    assert len(whole) == 4  # vgs, lvs, lvs --badopt, and the one at end of input
    for size in (1, 2, 7, 64, 1000):
        framer, docs = Framer(), []
        for i in range(0, len(STREAM), size):
            docs += framer.feed(STREAM[i : i + size])
        assert docs == whole


def test_statuses_and_messages_of_the_captured_stream() -> None:
    vgs, lvs, badopt, end = Framer().feed(STREAM)
    assert exit_status(vgs) == 0 and messages(vgs) == ""
    assert vgs["report"][0]["vg"] == [{"vg_name": "shtestvg", "vg_size": "205520896", "vg_free": "205520896"}]
    assert exit_status(lvs) == 5  # one VG of two is missing
    assert messages(lvs).splitlines() == [
        '  Volume group "nosuchvg" not found',
        "  Cannot process volume group nosuchvg",
    ]
    assert exit_status(badopt) == 3
    assert messages(badopt) == "  Error during parsing of command line."
    with pytest.raises(ProtocolError):
        exit_status(end)  # no command, no status


def test_a_stream_that_is_not_json_is_refused() -> None:
    with pytest.raises(ProtocolError):
        Framer().feed(b"lvm> \n")


def test_shell_line_quotes_spaces_and_refuses_what_its_splitter_could_misread() -> None:
    line = shell_line(["lvs", "--config", "activation{udev_sync=0 monitoring=0}", "--", "vg0"])
    assert line == b'lvs --config "activation{udev_sync=0 monitoring=0}" -- vg0\n'
    for bad in ("vg\nlvremove -y vg", 'a"b', "a'b", "a\\b", "", "a\x00b"):
        with pytest.raises(ValueError):
            shell_line(["lvs", bad])


# -- the process ---------------------------------------------------------------


def pids(record: Path) -> list[int]:
    return [int(line.split()[1]) for line in record.read_text().splitlines() if line.startswith("pid ")]


def lines(record: Path) -> list[str]:
    return [line for line in record.read_text().splitlines() if not line.startswith("pid ")]


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "record"


@pytest.fixture
async def runner() -> AsyncIterator[Runner]:
    r = Runner()
    try:
        yield r
    finally:
        await r.close(1)


@pytest.fixture
def sh(runner: Runner, record: Path) -> LvmShell:
    """A shell running the fake, which records to ``record``."""
    return LvmShell(runner, str(record.parent / "home"), argv=(sys.executable, FAKE, str(record)))


async def test_queries_share_one_shell_that_finds_elvs_profile(record: Path, sh: LvmShell) -> None:
    for vg in ("a", "b", "c"):
        res = await sh.query(["vgs", "--units", "b", "--", vg], timeout=10)
        assert res is not None and res.returncode == 0 and res.argv == ("lvm", "vgs", "--units", "b", "--", vg)
        assert f'"vg_name": "{vg}"' in res.text
    assert len(pids(record)) == 1
    assert record.read_text().splitlines()[0].endswith(" True")
    assert lines(record) == ["vgs --units b -- a", "vgs --units b -- b", "vgs --units b -- c"]


async def test_a_failed_report_carries_its_errors_and_the_missing_vg_is_found(runner: Runner, sh: LvmShell) -> None:
    lvm = Lvm(runner, udev=True, shell=sh)
    lvs, missing = await lvm.lvs(["vg0", "missing1"])
    assert [(lv.name) for lv in lvs] == [] and missing == {"missing1"}
    with pytest.raises(CommandError) as e:
        await lvm.query("vgs", "--", "missing2")
    assert e.value.returncode == 5 and b'Volume group "missing2" not found' in e.value.stderr


@pytest.mark.parametrize("how", ["die", "garbage", "nostatus"])
async def test_a_broken_shell_makes_way_for_a_plain_lvm_and_is_restarted(record: Path, sh: LvmShell, how: str) -> None:
    assert await sh.query(["vgs", "a"], timeout=10) is not None
    first = pids(record)[0]
    assert await sh.query([how], timeout=10) is None  # the caller runs lvm itself
    assert await wait_until(lambda: gone(first))
    res = await sh.query(["vgs", "b"], timeout=10)
    assert res is not None and res.returncode == 0
    assert len(pids(record)) == 2 and not sh.disabled


async def test_after_failures_in_a_row_the_shell_is_left_alone(record: Path, sh: LvmShell) -> None:
    for _ in range(shell_mod.MAX_FAILURES):
        assert await sh.query(["die"], timeout=10) is None
    assert sh.disabled
    assert await sh.query(["vgs", "a"], timeout=10) is None
    assert lines(record) == ["die"] * shell_mod.MAX_FAILURES  # nothing more was sent


async def test_a_shell_without_answer_times_out_and_is_killed(record: Path, sh: LvmShell) -> None:
    with pytest.raises(CommandTimeout):
        await sh.query(["hang"], timeout=0.5)
    assert gone(pids(record)[0]) and sh.pid is None
    res = await sh.query(["vgs", "a"], timeout=10)
    assert res is not None and res.returncode == 0


async def test_a_cancelled_report_kills_the_shell_and_the_next_gets_a_fresh_one(record: Path, sh: LvmShell) -> None:
    task = asyncio.ensure_future(sh.query(["hang"], timeout=30))
    assert await wait_until(lambda: record.exists() and "hang" in lines(record))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gone(pids(record)[0])
    res = await sh.query(["vgs", "a"], timeout=10)
    assert res is not None and res.returncode == 0 and len(pids(record)) == 2


async def test_the_shell_is_renewed_after_max_commands(
    record: Path, sh: LvmShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shell_mod, "MAX_COMMANDS", 2)
    for vg in "abcde":
        assert await sh.query(["vgs", vg], timeout=10) is not None
    assert len(pids(record)) == 3
    assert all(gone(p) for p in pids(record)[:2])


def test_the_system_dir_links_every_entry_of_etc_lvm_and_adds_the_profile(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "profile").mkdir(parents=True)
    (etc / "lvm.conf").write_text('devices { filter = [ "r|.*|" ] }\n')
    (etc / "devices").mkdir()
    (etc / "profile" / "thin-performance.profile").write_text("x\n")
    home = tmp_path / "home"
    (home / "profile").mkdir(parents=True)
    (home / "stale.conf").write_text("from an earlier start\n")
    shell_mod.system_dir(str(home), str(etc))
    assert sorted(p.name for p in home.iterdir()) == ["devices", "lvm.conf", "profile"]
    assert os.readlink(home / "lvm.conf") == str(etc / "lvm.conf")
    assert os.readlink(home / "devices") == str(etc / "devices")
    profiles = home / "profile"
    assert os.readlink(profiles / "thin-performance.profile") == str(etc / "profile" / "thin-performance.profile")
    assert (profiles / "elv-report.profile").read_text() == shell_mod.PROFILE_TEXT
    # No /etc/lvm at all: LVM's defaults, and still the profile.
    shell_mod.system_dir(str(home), str(tmp_path / "none"))
    assert sorted(p.name for p in home.iterdir()) == ["profile"]
    assert sorted(p.name for p in profiles.iterdir()) == ["elv-report.profile"]


async def test_an_argument_the_shell_could_misread_is_never_sent(record: Path, sh: LvmShell) -> None:
    assert await sh.query(["vgs", "a\nhang"], timeout=10) is None
    assert not record.exists()  # not even started


async def test_closing_the_runner_ends_the_shell(record: Path) -> None:
    runner = Runner()
    sh = LvmShell(runner, str(record.parent / "home"), argv=(sys.executable, FAKE, str(record)))
    assert await sh.query(["vgs", "a"], timeout=10) is not None
    await runner.close(1)
    assert gone(pids(record)[0])


async def test_the_shell_runs_in_the_root_directory(record: Path, sh: LvmShell) -> None:
    """It lives as long as the driver: it must not hold the directory the
    driver was started in (a test's scratch directory, a mount point)."""
    assert await sh.query(["vgs", "a"], timeout=10) is not None
    assert os.readlink(f"/proc/{pids(record)[0]}/cwd") == "/"
