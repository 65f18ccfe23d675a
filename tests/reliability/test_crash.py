"""Fault injection: SIGKILL ``elv serve`` at random points in a stream of
operations, restart it, and let an orchestrator's retries converge.

At the end nothing may be leaked (backing files, loop devices, mounts), no
volume may be lost, and every file written (and fsynced) before a kill must
read back with the same checksum. Set ELV_CRASH_SEED to replay a run and
ELV_CRASH_KILLS to change the number of kills (default 200).
"""

from __future__ import annotations

import os
import time

from tests.support.crash import KILLS, SEED, World
from tests.support.driver import Driver, leftovers


def test_kill_anywhere_and_converge(base: str) -> None:
    print(f"crash test seed={SEED} kills={KILLS} (replay with ELV_CRASH_SEED={SEED})")
    d = Driver(base).start()
    w = World(d, SEED)
    t0 = time.monotonic()
    try:
        while w.o.kills < KILLS:
            w.step()
            w.verify()
        w.restage_all()
        w.verify()
        w.teardown()
        assert leftovers(base) == []
        for sub in ("volumes", "snapshots", "tmp", "groups"):
            assert os.listdir(os.path.join(d.pool, sub)) == [], f"leaked files in {sub}"
        assert not os.listdir(os.path.join(base, "run", "commands"))
    finally:
        d.stop()
        w.report("crash test", time.monotonic() - t0, "crash-summary.txt")
