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

from tests.support.crash import DEBUG_LOG, KILLS, SEED, World, slow_tools
from tests.support.driver import Driver, leftovers

#: Tools the loop backend runs in its RPCs, slowed so that kills land in them too.
TOOLS = ["mkfs.ext4", "mkfs.xfs", "blkid", "cp", "fsfreeze", "resize2fs", "xfs_growfs", "e2fsck"]


class LoopWorld(World):
    # After the RPC entered the driver: a loop RPC takes milliseconds, plus up
    # to 120 ms in each slowed tool (a longer window misses more often).
    kill_window = 0.1


def test_kill_anywhere_and_converge(base: str) -> None:
    print(f"crash test seed={SEED} kills={KILLS} (replay with ELV_CRASH_SEED={SEED})")
    tool_path = slow_tools(os.path.join(base, "slow-tools"), TOOLS)
    d = Driver(base, *DEBUG_LOG, "--tool-path", tool_path).start()
    # Restarts fork a pre-imported interpreter (tests/support/forked.py): a new
    # process all the same, a third of the time to start.
    d.fork = True
    w = LoopWorld(d, SEED)
    t0 = time.monotonic()
    try:
        while w.o.kills < KILLS:
            w.step()
            w.verify()
        # The kills cut every kind of operation, in its tools and in the driver's own code.
        ops = {k.split("/")[0] for k in w.o.cut}
        assert {"create", "stage", "snapshot", "delete", "expand"} <= ops or KILLS < 100, w.o.cut_report()
        inside_tools = [k for k in w.o.cut if not k.endswith("/in-process")]
        assert inside_tools and len(inside_tools) < len(w.o.cut), w.o.cut_report()
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
