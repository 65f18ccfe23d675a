"""Driver shutdown: background work stops and no command outlives the loop."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from csi.config import Config
from csi.host.runner import Runner
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
