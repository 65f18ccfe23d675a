"""Driver shutdown: background work stops and no command outlives the loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from csi.config import Config
from csi.host.runner import Runner
from csi.server import driver as driver_mod
from csi.server.driver import Driver
from tests.support.fakes import FakeBackend


async def test_stop_stops_the_backend_and_reaps_every_command(tmp_path: Path) -> None:
    cfg = Config(endpoint=f"unix://{tmp_path}/csi.sock", node_id="node-a", state_dir=str(tmp_path / "run"))
    backend = FakeBackend()
    runner = Runner()
    driver = Driver(cfg, runner=runner, backend=backend)
    await driver.start()
    assert os.path.exists(tmp_path / "csi.sock")
    # What the LVM wiper does between passes: a read-only query nobody awaits.
    pidfile = tmp_path / "pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(30)"
    query = asyncio.ensure_future(runner.run([sys.executable, "-c", code], mutating=False))
    for _ in range(250):
        if pidfile.exists() and pidfile.read_text():
            break
        await asyncio.sleep(0.02)
    pid = int(pidfile.read_text())

    await driver.stop(grace=0.5)

    assert backend.methods()[-1] == "stop"
    assert runner.running == 0
    assert query.cancelled()
    assert not os.path.exists(f"/proc/{pid}"), "the command was not reaped"
    assert not os.path.exists(tmp_path / "csi.sock")


async def test_stop_gives_every_phase_one_deadline(tmp_path: Path) -> None:
    # Each phase (RPCs, shielded operations, commands) used to get the whole
    # grace: up to 37 s in all, and the harness (like Kubernetes) kills at 30 s.
    cfg = Config(endpoint=f"unix://{tmp_path}/csi.sock", node_id="node-a", state_dir=str(tmp_path / "run"))
    runner = Runner()
    driver = Driver(cfg, runner=runner, backend=FakeBackend())
    await driver.start()
    never = asyncio.Event()
    # An operation that outlives its RPC (the gate shields it) and a mutating command.
    op = asyncio.ensure_future(driver.gate.run("Slow", ["v-1"], b"x", never.wait))
    cmd = asyncio.ensure_future(runner.run(["sleep", "30"], mutating=True))
    await asyncio.sleep(0.2)
    graces: list[float] = []
    close = runner.close

    async def spy(grace: float) -> int:
        graces.append(grace)
        return await close(grace)

    runner.close = spy  # type: ignore[method-assign]
    await driver.stop(grace=0.5)
    assert graces == [driver_mod.COMMAND_GRACE], "the operation used up the deadline; commands get only their minimum"
    assert cmd.done() and runner.running == 0
    never.set()
    await op


def test_the_exit_watchdog_ends_a_process_whose_exit_hangs() -> None:
    # A worker thread blocked for good keeps the interpreter from exiting (it
    # joins every non-daemon thread); the watchdog dumps the stacks and exits.
    code = """
import threading, time
from csi.server.driver import _arm_exit_watchdog
threading.Thread(target=threading.Event().wait, name="stuck-worker").start()
_arm_exit_watchdog(0.5)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == driver_mod.EXIT_WATCHDOG, proc.stderr
    assert "stuck-worker" in proc.stderr or "Thread 0x" in proc.stderr, proc.stderr


async def test_a_failed_start_ends_the_sessions_it_began(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A driver that cannot start (a thin pool without zeroing) had started
    the resident lvm shell; left to the garbage collector after the loop
    closed, its transport logged a traceback (CI, 2026-12-05)."""
    from csi.errors import FailedPrecondition

    sessions = []

    async def start(self: Driver) -> None:
        sessions.append(
            await self.runner.session([sys.executable, "-c", "import time; time.sleep(30)"], report_env="R")
        )
        raise FailedPrecondition("the pool does not zero")

    monkeypatch.setattr(Driver, "start", start)
    monkeypatch.setattr(driver_mod, "build", lambda config, runner: FakeBackend())
    cfg = Config(endpoint=f"unix://{tmp_path}/csi.sock", node_id="node-a", state_dir=str(tmp_path / "run"))
    assert await driver_mod.run(cfg) == 1
    assert sessions and not sessions[0].alive
    assert not os.path.exists(f"/proc/{sessions[0].pid}")
