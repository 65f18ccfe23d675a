"""The Runner, with real child processes (only ``sys.executable -c``)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csi.errors import CommandError, CommandTimeout
from csi.host import procs
from csi.host.runner import SAFE_PATH, Runner
from tests.support.paths import REPO

PY = sys.executable


def py(code: str, *args: str) -> list[str]:
    return [PY, "-c", code, *args]


def gone(pid: int) -> bool:
    """True when the process no longer runs (reaped, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


async def read_pid(path: Path) -> int:
    assert await wait_until(lambda: path.exists() and path.read_text().strip() != ""), "the child never started"
    return int(path.read_text().split()[0])


# A child that records its pid (and, optionally, a grandchild's) and then sleeps.
SLEEPER = """
import os, subprocess, sys, time
pidfile, seconds, donefile = sys.argv[1], float(sys.argv[2]), sys.argv[3]
pids = [os.getpid()]
if donefile == "grandchild":
    pids.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]).pid)
    donefile = ""
with open(pidfile + ".tmp", "w") as f:
    f.write(" ".join(map(str, pids)))
os.rename(pidfile + ".tmp", pidfile)
time.sleep(seconds)
if donefile:
    open(donefile, "w").write("done")
"""


# A child that records its pid, waits until the test creates ``release``, then writes ``done``.
GATED = """
import os, sys, time
pidfile, release, donefile = sys.argv[1:4]
with open(pidfile + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(pidfile + ".tmp", pidfile)
deadline = time.monotonic() + 30
while not os.path.exists(release) and time.monotonic() < deadline:
    time.sleep(0.01)
with open(donefile, "w") as f:
    f.write("done")
"""


async def test_success_returns_output_and_status() -> None:
    r = Runner()
    res = await r.run(py("import sys; print('hello'); print('warn', file=sys.stderr)"))
    assert res.returncode == 0
    assert res.stdout == b"hello\n"
    assert res.stderr == b"warn\n"
    assert res.text == "hello\n"
    assert res.argv == (PY, "-c", "import sys; print('hello'); print('warn', file=sys.stderr)")
    assert res.seconds > 0


async def test_stdin_is_passed_and_defaults_to_devnull() -> None:
    r = Runner()
    res = await r.run(py("import sys; print(sys.stdin.read().upper())"), stdin=b"abc")
    assert res.stdout == b"ABC\n"
    res = await r.run(py("import sys; print(repr(sys.stdin.read()))"))
    assert res.stdout == b"''\n"


async def test_nonzero_exit_raises_command_error() -> None:
    r = Runner()
    argv = py(
        "import sys; print('partial'); print('line one', file=sys.stderr); "
        "print('mkfs: device is busy', file=sys.stderr); sys.exit(3)"
    )
    with pytest.raises(CommandError) as ei:
        await r.run(argv)
    e = ei.value
    assert not isinstance(e, CommandTimeout)
    assert e.argv == tuple(argv)
    assert e.returncode == 3
    assert e.stdout == b"partial\n"
    assert e.stderr == b"line one\nmkfs: device is busy\n"
    assert str(e) == f"{PY} exited with status 3: mkfs: device is busy"


async def test_ok_codes_accept_other_statuses() -> None:
    r = Runner()
    res = await r.run(py("import sys; sys.exit(2)"), ok_codes=(0, 2))
    assert res.returncode == 2
    with pytest.raises(CommandError):
        await r.run(py("import sys; sys.exit(0)"), ok_codes=(2,))


async def test_timeout_kills_the_child_and_its_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    seen: list[tuple[str, float, int | None]] = []
    r = Runner(observer=lambda *a: seen.append(a))
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as ei:
        await r.run(py(SLEEPER, str(pidfile), "60", "grandchild"), timeout=0.5)
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 5
    assert ei.value.timeout == 0.5
    assert str(ei.value) == f"{PY} did not finish within 0.5s and was killed"
    child, grandchild = (int(p) for p in pidfile.read_text().split())
    assert gone(child)
    # The whole process group is killed, not just the direct child.
    assert await wait_until(lambda: gone(grandchild), 3.0)
    ((program, seconds, rc),) = seen
    assert (program, rc) == (os.path.basename(PY), None)
    assert 0.5 <= seconds <= elapsed


async def test_default_timeout_applies(tmp_path: Path) -> None:
    r = Runner(default_timeout=0.3)
    with pytest.raises(CommandTimeout):
        await r.run(py("import time; time.sleep(30)"))


async def test_child_env_is_fixed_and_the_parent_env_does_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELV_TEST_SECRET", "must-not-leak")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    assert os.environ["ELV_TEST_SECRET"] == "must-not-leak"
    r = Runner(extra_env={"ELV_EXTRA": "1"})
    res = await r.run(py("import json, os; print(json.dumps(dict(os.environ)))"))
    env = json.loads(res.stdout)
    assert "ELV_TEST_SECRET" not in env
    assert env["LC_ALL"] == "C"
    assert env["LANG"] == "C"
    assert env["PATH"] == SAFE_PATH
    assert env["ELV_EXTRA"] == "1"
    assert "HOME" not in env
    assert "VIRTUAL_ENV" not in env


async def test_search_path_sets_the_childs_path() -> None:
    r = Runner(search_path="/opt/elv/bin:/usr/bin")
    res = await r.run(py("import os; print(os.environ['PATH'])"))
    assert res.stdout == b"/opt/elv/bin:/usr/bin\n"


async def test_no_shell_is_involved() -> None:
    r = Runner()
    res = await r.run(py("import sys; print(sys.argv[1:])", "$(id)", "; rm -rf /", "a b"))
    assert res.stdout == b"['$(id)', '; rm -rf /', 'a b']\n"


@pytest.mark.parametrize(
    ("argv", "exc", "match"),
    [
        ("echo hi", TypeError, "non-empty list"),
        (b"echo hi", TypeError, "non-empty list"),
        ([], TypeError, "non-empty list"),
        ((), TypeError, "non-empty list"),
        (["echo", 1], TypeError, "must be str, not int"),
        (["echo", b"x"], TypeError, "must be str, not bytes"),
        (["echo", "a\x00b"], ValueError, "NUL"),
        (["\x00"], ValueError, "NUL"),
    ],
)
async def test_argv_validation(argv, exc: type[Exception], match: str) -> None:
    r = Runner()
    with pytest.raises(exc, match=match):
        await r.run(argv)


async def test_mutating_command_survives_cancellation(tmp_path: Path) -> None:
    pidfile, release, donefile = tmp_path / "pid", tmp_path / "release", tmp_path / "done"
    r = Runner(max_parallel=1)
    task = asyncio.ensure_future(r.run(py(GATED, str(pidfile), str(release), str(donefile)), mutating=True))
    pid = await read_pid(pidfile)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    assert not gone(pid), "a mutating command was killed when its caller was cancelled"
    release.touch()
    assert await wait_until(donefile.exists, 10.0), "the mutating command did not run to completion"
    assert donefile.read_text() == "done"
    # The shielded command keeps its slot until it ends; the next one waits for it.
    res = await r.run(py("print('next')"))
    assert res.stdout == b"next\n"
    assert await wait_until(lambda: gone(pid), 2.0)


async def test_read_only_command_is_killed_on_cancellation(tmp_path: Path) -> None:
    pidfile, donefile = tmp_path / "pid", tmp_path / "done"
    r = Runner()
    task = asyncio.ensure_future(r.run(py(SLEEPER, str(pidfile), "30", str(donefile)), mutating=False))
    pid = await read_pid(pidfile)
    assert not gone(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_until(lambda: gone(pid), 3.0), "a cancelled read-only command was left running"
    assert not donefile.exists()


# Each child appends "start end" (monotonic clock, shared by all processes) to a log.
SPAN = """
import sys, time
start = time.monotonic(); time.sleep(0.3); end = time.monotonic()
with open(sys.argv[1], "a") as f:
    f.write(f"{start} {end}\\n")
"""


async def test_parallelism_is_bounded(tmp_path: Path) -> None:
    log = tmp_path / "spans"
    r = Runner(max_parallel=2)
    start = time.monotonic()
    await asyncio.gather(*(r.run(py(SPAN, str(log))) for _ in range(4)))
    elapsed = time.monotonic() - start
    assert elapsed >= 0.6
    spans = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
    assert len(spans) == 4
    # Never more than two at once, and two did run at once.
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak == 2


async def test_observer_sees_each_command_and_cannot_break_it() -> None:
    seen: list[tuple[str, float, int | None]] = []
    r = Runner(observer=lambda *a: seen.append(a))
    await r.run(py("pass"))
    with pytest.raises(CommandError):
        await r.run(py("raise SystemExit(4)"))
    assert [(name, rc) for name, _, rc in seen] == [(os.path.basename(PY), 0), (os.path.basename(PY), 4)]

    def broken(*_: object) -> None:
        raise RuntimeError("metrics down")

    res = await Runner(observer=broken).run(py("print(1)"))
    assert res.stdout == b"1\n"


# -- the journal of running mutating commands --------------------------------------------------


async def test_mutating_commands_are_journaled_while_running(tmp_path: Path) -> None:
    journal = tmp_path / "commands"
    journal.mkdir()
    pidfile, release, donefile = tmp_path / "pid", tmp_path / "release", tmp_path / "done"
    argv = py(GATED, str(pidfile), str(release), str(donefile))
    r = Runner(journal_dir=str(journal))
    task = asyncio.ensure_future(r.run(argv))
    pid = await read_pid(pidfile)
    entry = journal / f"{pid}.json"
    assert entry.exists()
    assert json.loads(entry.read_text())["argv"] == argv
    release.touch()
    await task
    assert os.listdir(journal) == []
    # Read-only commands are not journaled.
    await r.run(py("import os, sys; print(os.listdir(sys.argv[1]))", str(journal)), mutating=False)
    assert os.listdir(journal) == []


async def test_a_missing_journal_dir_does_not_break_commands(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    r = Runner(journal_dir=str(tmp_path / "missing"))
    res = await r.run(py("print('ok')"))
    assert res.stdout == b"ok\n"
    assert "cannot record running command" in caplog.text


def spawn_orphan(journal: Path, seconds: float) -> subprocess.Popen[bytes]:
    """A command 'left running by a previous driver', with its journal entry."""
    proc = subprocess.Popen([PY, "-c", f"import time; time.sleep({seconds})"], start_new_session=True)
    for _ in range(100):
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            cmdline = f.read().decode()
        if "time.sleep" in cmdline:
            break
        time.sleep(0.01)
    (journal / f"{proc.pid}.json").write_text(json.dumps({"argv": [PY], "cmdline": cmdline}))
    return proc


async def test_wait_for_orphans_kills_what_outlives_the_timeout(tmp_path: Path) -> None:
    journal = tmp_path / "commands"
    journal.mkdir()
    orphan = spawn_orphan(journal, 30)
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    (journal / f"{dead.pid}.json").write_text(json.dumps({"argv": [PY], "cmdline": "gone"}))
    (journal / "garbage.json").write_text("{")
    (journal / "123.json").write_text("not json")
    try:
        start = time.monotonic()
        n = await Runner(journal_dir=str(journal)).wait_for_orphans(timeout=0.3)
        assert time.monotonic() - start >= 0.3
        assert n == 1
        assert orphan.wait(timeout=3) == -9
        assert os.listdir(journal) == []
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


async def test_wait_for_orphans_without_a_journal(tmp_path: Path) -> None:
    assert await Runner().wait_for_orphans(timeout=1) == 0
    journal = tmp_path / "new" / "commands"
    assert await Runner(journal_dir=str(journal)).wait_for_orphans(timeout=1) == 0
    assert journal.is_dir()


async def test_wait_for_orphans_waits_for_one_that_finishes(tmp_path: Path) -> None:
    journal = tmp_path / "commands"
    journal.mkdir()
    orphan = spawn_orphan(journal, 0.3)
    try:
        start = time.monotonic()
        await Runner(journal_dir=str(journal)).wait_for_orphans(timeout=10)
        assert time.monotonic() - start < 5
        assert orphan.wait(timeout=3) == 0  # finished on its own, not killed
        assert os.listdir(journal) == []
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


async def test_wait_for_orphans_counts_what_it_waited_for(tmp_path: Path) -> None:
    journal = tmp_path / "commands"
    journal.mkdir()
    orphan = spawn_orphan(journal, 0.3)
    try:
        assert await Runner(journal_dir=str(journal)).wait_for_orphans(timeout=10) == 1
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait()


async def test_journal_names_the_process_across_its_exec(tmp_path: Path) -> None:
    """A tool reached through a wrapper script (a --tool-path shim that execs
    the real program) shows another command line before and after its exec.
    The entry names the process by pid and start time, which the exec keeps,
    so a restarted driver still waits for it (it once matched command lines,
    and raced such orphans: an fsfreeze left running froze a filesystem after
    the new driver's recovery had thawed it)."""
    tools, journal = tmp_path / "bin", tmp_path / "commands"
    tools.mkdir()
    journal.mkdir()
    shim = tools / "tool"
    shim.write_text(f"#!/bin/sh\nsleep 0.3\nexec {PY} -c 'import time; time.sleep(0.5)'\n")
    shim.chmod(0o755)
    task = asyncio.ensure_future(Runner(journal_dir=str(journal), search_path=str(tools)).run(["tool", "--go"]))
    entries: list[Path] = []
    for _ in range(200):
        entries = list(journal.glob("*.json"))
        if entries:
            break
        await asyncio.sleep(0.005)
    assert len(entries) == 1
    pid = int(entries[0].stem)
    rec = json.loads(entries[0].read_text())
    assert rec["argv"] == ["tool", "--go"] and rec["process"] == procs.token(pid)
    # A new driver starting now waits until the tool, exec'd or not, has ended.
    start = time.monotonic()
    assert await Runner(journal_dir=str(journal)).wait_for_orphans(timeout=10) == 1
    assert time.monotonic() - start >= 0.4
    assert procs.start_time(pid) is None  # gone (or a zombie), not merely renamed
    assert (await task).returncode == 0
    assert list(journal.glob("*.json")) == []


async def test_an_entry_whose_pid_now_names_another_process_is_dropped(tmp_path: Path) -> None:
    journal = tmp_path / "commands"
    journal.mkdir()
    me = os.getpid()
    (journal / f"{me}.json").write_text(json.dumps({"argv": ["mkfs.ext4"], "process": f"{me} 1"}))
    assert await Runner(journal_dir=str(journal)).wait_for_orphans(timeout=10) == 0
    assert list(journal.glob("*.json")) == []


async def test_close_lets_commands_finish_then_kills_and_reaps_the_rest(tmp_path: Path) -> None:
    pidfile, release, donefile = tmp_path / "pid", tmp_path / "release", tmp_path / "done"
    sleeper_pid = tmp_path / "sleeper"
    r = Runner()
    mkfs = asyncio.ensure_future(r.run(py(GATED, str(pidfile), str(release), str(donefile)), mutating=True))
    lvs = asyncio.ensure_future(r.run(py(SLEEPER, str(sleeper_pid), "30", ""), mutating=False))
    await read_pid(pidfile)
    slow = await read_pid(sleeper_pid)
    assert r.running == 2
    asyncio.get_running_loop().call_later(0.3, release.touch)
    killed = await r.close(grace=2.0)
    assert killed == 1
    assert (await mkfs).returncode == 0 and donefile.read_text() == "done"
    with pytest.raises(asyncio.CancelledError):
        await lvs
    # Reaped, not merely killed: no zombie, no transport left for the GC.
    assert not os.path.exists(f"/proc/{slow}")
    assert r.running == 0
    assert await r.close(grace=0.1) == 0


# The driver's shutdown as asyncio.run sees it: a background task's command is
# still running when the main coroutine returns and the loop closes.
SHUTDOWN = """
import asyncio, sys
from csi.host.runner import Runner
from csi.server.driver import _fast_child_watcher

async def main(mode, watcher):
    if watcher == "pidfd":
        _fast_child_watcher(asyncio.get_running_loop())  # what the driver uses on 3.11
    r = Runner()
    task = asyncio.ensure_future(r.run([sys.executable, "-c", "import time; time.sleep(30)"], mutating=False))
    await asyncio.sleep(0.5)
    if mode == "close":
        await r.close(grace=0.1)
    else:
        task.cancel()
        await asyncio.sleep(0)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("watcher", ["default", "pidfd"])
@pytest.mark.parametrize("mode", ["close", "cancel"])
def test_the_loop_closes_with_no_child_or_transport_left(mode: str, watcher: str) -> None:
    root = REPO
    env = {**os.environ, "PYTHONPATH": root, "PYTHONDEVMODE": "1"}
    out = subprocess.run(
        [PY, "-c", SHUTDOWN, mode, watcher], capture_output=True, text=True, timeout=60, env=env, cwd=root
    )
    assert out.returncode == 0, out.stderr
    assert "Event loop is closed" not in out.stderr
    assert "Traceback" not in out.stderr and "Warning" not in out.stderr, out.stderr
