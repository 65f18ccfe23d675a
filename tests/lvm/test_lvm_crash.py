"""The crash test of tests/reliability, on the lvm backend: SIGKILL ``elv serve
--backend lvm`` at random points in a stream of create, delete, stage,
publish, unpublish, unstage, expand, snapshot and clone (thick and thin),
restart it, and let an orchestrator's retries converge.

At the end no LV of ELV's is left (the wiper included), no device-mapper
device of ELV's is active, nothing is mounted or attached under the test's
directory, no volume was lost, and every file written (and fsynced) before a
kill reads back with its checksum. ``scripts/lvm-vm`` runs it as a third
stream beside the other two; ``scripts/lvm-vm tests/lvm/test_lvm_crash.py``
runs it alone (ELV_CRASH_KILLS, default 200; ELV_CRASH_SEED replays a run). A
restart forks a pre-imported interpreter (tests/support/forked.py), so a
kill costs about four seconds in the emulated guest instead of nine.
"""

from __future__ import annotations

import os
import time

import pytest

from csi.model import DEVICE_CLASS as CLASS
from tests.support.crash import KILLS, SEED, Snap, Vol, World
from tests.support.driver import leftovers
from tests.support.lvm import GuestVg, LvmDriver, class_config, ours, wait_for, write_config

# Seconds a kill in the guest (more while other streams share its two vCPUs):
# far beyond the usual per-test bound.
pytestmark = pytest.mark.timeout(600 + 40 * KILLS)


class LvmWorld(World):
    # An LVM RPC takes about a second in the guest: kill anywhere inside it.
    kill_window = 1.5

    def __init__(self, d: LvmDriver, seed: int) -> None:
        super().__init__(d, seed)
        self.classes: dict[str, str] = {}  # volume name -> device class

    def parameters(self, source: Snap | None, fs: str | None) -> dict[str, str]:
        if source is not None:
            cls = self.classes[source.source.name]
        elif fs == "xfs":
            cls = "thin"  # 300 MiB volumes: the thick class's COW snapshots would need as much again
        else:
            cls = self.rng.choice(["thick", "thin"])
        self.classes[f"crash-{self.n}"] = cls
        return {CLASS: cls}

    def may_expand(self, v: Vol) -> bool:
        # LVM grows a thick origin only while it has no snapshot (or is not
        # staged): the driver answers FAILED_PRECONDITION then, by design
        # (tests/lvm/test_lvm_data.py checks that answer).
        return self.classes[v.name] == "thin" or (not v.staged and not any(s.source is v for s in self.snaps))

    def step(self) -> None:
        # Bound the thick class's snapshots (each COW store is as big as its origin).
        while len(self.snaps) > 4:
            self.delete_snapshot(self.snaps[0])
        super().step()


def test_lvm_kill_anywhere_and_converge(base: str, vg: GuestVg) -> None:
    print(f"lvm crash test seed={SEED} kills={KILLS} (replay with ELV_CRASH_SEED={SEED})")
    cfg = write_config(os.path.join(base, "lvm.toml"), class_config(vg, ratio=20.0))
    d = LvmDriver(base, ["--lvm-config", cfg]).start()
    # Restarts fork a pre-imported Python: a new process all the same, without
    # the four seconds an emulated interpreter spends importing grpc.
    d.fork = True
    w = LvmWorld(d, SEED)
    t0 = time.monotonic()
    try:
        reported = 0
        while w.o.kills < KILLS:
            w.step()
            w.verify()
            if w.o.kills >= reported + 10:
                # A long run in the guest shows nothing until it ends: leave a trace in ci-out.
                reported = w.o.kills
                with open("ci-out/lvm-crash-progress.txt", "a") as f:
                    f.write(
                        f"{time.monotonic() - t0:.0f}s kills={w.o.kills} ops={w.o.ops} "
                        f"restarts={w.o.restart_seconds:.0f}s\n"
                    )
        w.restage_all()
        w.verify()
        w.teardown()
        wait_for(lambda: not ours(vg), 300, "the wiper to remove every LV of ELV's")
        assert leftovers(base) == []
        dm = [n for n in os.listdir("/sys/block") if n.startswith("dm-")]
        names = []
        for n in dm:
            with open(f"/sys/block/{n}/dm/name", encoding="utf-8") as f:
                names.append(f.read().strip())
        # Only this test's VG: the guest's other streams have live LVs of their own
        # (device-mapper doubles a dash in a VG name).
        mine = vg.name.replace("-", "--") + "-elv-"
        assert not [n for n in names if n.startswith(mine)], names
        assert not os.listdir(os.path.join(base, "run", "commands"))
    finally:
        rc = d.stop()
        w.report("lvm crash test", time.monotonic() - t0, "lvm-crash-summary.txt", f" driver exit={rc}")
    assert rc == 0, d.log()[-3000:]
    assert "Traceback" not in d.log(), d.log()[-5000:]
