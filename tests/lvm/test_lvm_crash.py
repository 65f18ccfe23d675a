"""The crash test of tests/reliability, on the lvm backend: SIGKILL ``elv serve
--backend lvm`` at random points in a stream of create, delete, stage,
publish, unpublish, unstage, expand, snapshot and clone (thick and thin),
restart it, and let an orchestrator's retries converge.

At the end no LV of ELV's is left (the wiper included), no device-mapper
device of ELV's is active, nothing is mounted or attached under the test's
directory, no volume was lost, and every file written (and fsynced) before a
kill reads back with its checksum. ``scripts/lvm-vm`` runs it as a third
stream beside the other two; ``scripts/lvm-vm tests/lvm/test_lvm_crash.py``
runs it alone (ELV_CRASH_KILLS, default 200; ELV_CRASH_SEED replays a run).
ELV_LVM_CRASH_SECONDS time-boxes it: the kill loop stops at that many
seconds (or at ELV_CRASH_KILLS, whichever comes first) and every end check
still runs. CI runs such a slice with a fresh seed (an LVM kill costs about
14 s in the emulated guest: 200 of them took 50 minutes); ``make soak`` runs
the full count. A
restart forks a pre-imported interpreter (tests/support/forked.py), so a
kill costs about four seconds in the emulated guest instead of nine.

Every 10 kills it records the thin pool's data%/metadata%/mode and what
backs the PVs (ci-out/lvm-crash-progress.txt); the kernel must say nothing
about this VG's devices (no I/O error, write error, out-of-data-space or
filesystem shutdown); on any failure ci-out/lvm-crash-failure.txt (and the
assertion) hold dmsetup status, lvs -a, df, the kernel log and the
driver's log tail (tests/support/lvm_watch.py).
"""

from __future__ import annotations

import os
import time

import grpc
import pytest

from csi.model import DEVICE_CLASS as CLASS
from tests.support.crash import DEBUG_LOG, KILLS, SEED, Snap, Vol, World
from tests.support.driver import leftovers
from tests.support.lvm import GuestVg, LvmDriver, class_config, ours, wait_for, write_config
from tests.support.lvm_watch import KernelWatch, backing_usage, failure_report, pool_status

#: The fewest kills a time-boxed slice must reach.
MIN_SLICE_KILLS = 10
#: The kill loop's time box in seconds (0: none, run all KILLS).
BOX = float(os.environ.get("ELV_LVM_CRASH_SECONDS", "0") or 0)

# Seconds a kill in the guest (more while other streams share its two vCPUs):
# far beyond the usual per-test bound.
pytestmark = pytest.mark.timeout(600 + (BOX + 600 if BOX else 40 * KILLS))


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


def progress_line(w: LvmWorld, vg: GuestVg, seconds: float, peak: dict[str, float]) -> str:
    """One line of the run's trace: kills, operations, the pool, the backing."""
    pool = pool_status(vg.name, vg.pool)
    if pool is not None:
        peak["data"] = max(peak.get("data", 0.0), pool.data_percent)
        peak["metadata"] = max(peak.get("metadata", 0.0), pool.metadata_percent)
    return (
        f"{seconds:.0f}s kills={w.o.kills} ops={w.o.ops} restarts={w.o.restart_seconds:.0f}s "
        f"pool: {pool or 'inactive'}; backing: {backing_usage(vg)}"
    )


def lvm_shell(entry: str) -> bool:
    """Whether a journal entry names a live ``lvm`` started without arguments."""
    try:
        with open(f"/proc/{int(entry.removesuffix('.json'))}/cmdline", "rb") as f:
            return f.read().split(b"\0")[:2] in ([b"lvm", b""], [b"lvm"])
    except (OSError, ValueError):
        return False


def test_lvm_kill_anywhere_and_converge(base: str, vg: GuestVg) -> None:
    box = f", time box {BOX:.0f} s" if BOX else ""
    print(f"lvm crash test seed={SEED} kills={KILLS}{box} (replay with ELV_CRASH_SEED={SEED})")
    cfg = write_config(os.path.join(base, "lvm.toml"), class_config(vg, ratio=20.0))
    watch = KernelWatch(vg).start()
    d = LvmDriver(base, ["--lvm-config", cfg], *DEBUG_LOG)
    d.start()
    # Restarts fork a pre-imported Python: a new process all the same, without
    # the four seconds an emulated interpreter spends importing grpc.
    d.fork = True
    w = LvmWorld(d, SEED)
    t0 = time.monotonic()
    progress: list[str] = []
    peak: dict[str, float] = {}
    rc: int | None = None
    try:
        reported = 0
        while w.o.kills < KILLS and not (BOX and time.monotonic() - t0 >= BOX):
            w.step()
            w.verify()
            if w.o.kills >= reported + 10:
                # A long run in the guest shows nothing until it ends: leave a trace in ci-out.
                reported = w.o.kills
                progress.append(progress_line(w, vg, time.monotonic() - t0, peak))
                with open("ci-out/lvm-crash-progress.txt", "a") as f:
                    f.write(progress[-1] + "\n")
        # A slice too short to kill anything proves nothing: say so, do not pass.
        assert w.o.kills >= min(KILLS, MIN_SLICE_KILLS), f"only {w.o.kills} kills in the {BOX:.0f} s box"
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
        journal = os.path.join(base, "run", "commands")
        # While the driver runs, its journal may name only its resident lvm
        # shell for changes (a bare `lvm`, alive), never a command left over.
        assert [e for e in os.listdir(journal) if not lvm_shell(e)] == [], os.listdir(journal)
        rc = d.stop()
        assert rc == 0, d.log()[-3000:]
        assert not os.path.isdir(journal) or not os.listdir(journal), "a clean stop left the journal"
        assert "Traceback" not in d.log(), d.log()[-5000:]
        bad = watch.stop()
        assert not bad, "the kernel complained about this VG's devices:\n" + "\n".join(bad[-40:])
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a failed check, an RPC error, an OS error, pytest's timeout
        # Say why, from outside the driver: the pool, the backing, the kernel, the log.
        report = failure_report(vg, d.log(), watch.stop(), progress)
        with open("ci-out/lvm-crash-failure.txt", "w", encoding="utf-8") as f:
            f.write(report)
        if not isinstance(e, AssertionError | grpc.RpcError | OSError):
            raise
        raise AssertionError(f"{e}\n-- ci-out/lvm-crash-failure.txt --\n{report[:12000]}") from e
    finally:
        if rc is None:
            rc = d.stop()
        watch.stop()
        peaks = f" pool peak data={peak.get('data', 0):.1f}% metadata={peak.get('metadata', 0):.1f}%"
        sliced = f" (a slice: {BOX:.0f} s box, {KILLS} kills in make soak)" if BOX and w.o.kills < KILLS else ""
        w.report("lvm crash test", time.monotonic() - t0, "lvm-crash-summary.txt", f" driver exit={rc}{peaks}{sliced}")
