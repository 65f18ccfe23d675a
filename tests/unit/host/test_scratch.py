"""Scratch directories and reaping what a killed run left (csi/host/scratch.py, tests/reap.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from csi.host import procs, scratch
from tests import reap


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_new_scratch_dir_is_owned_by_this_process(tmp_path: Path) -> None:
    base = scratch.make("it", root=str(tmp_path))
    assert os.path.basename(base).startswith("elv-it-")
    assert scratch.owner_alive(base)
    assert scratch.stale(str(tmp_path)) == []


def test_reap_removes_only_what_a_dead_owner_left(tmp_path: Path) -> None:
    live = scratch.make("it", root=str(tmp_path))
    dead = scratch.make("fuzz", root=str(tmp_path))
    (Path(dead) / scratch.OWNER).write_text(procs.token(_dead_pid()))
    (Path(dead) / "pool").mkdir()
    # A live pid with another start time is a reused pid, not the owner.
    reused = scratch.make("sm", root=str(tmp_path))
    (Path(reused) / scratch.OWNER).write_text(f"{os.getpid()} 1\n")
    garbled = scratch.make("bench", root=str(tmp_path))
    (Path(garbled) / scratch.OWNER).write_text("not a pid\n")
    # Not ours: no owner file, another prefix, a symlink to an owned dir.
    unowned = tmp_path / "elv-unit-hypothesis"
    unowned.mkdir()
    other = tmp_path / "other-dir"
    other.mkdir()
    (other / scratch.OWNER).write_text(procs.token(_dead_pid()))
    (tmp_path / "elv-link").symlink_to(dead)

    assert scratch.stale(str(tmp_path)) == sorted([dead, reused, garbled])
    removed, failed = scratch.reap(str(tmp_path))
    assert sorted(removed) == sorted([dead, reused, garbled]) and failed == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [os.path.basename(live), "elv-unit-hypothesis", "other-dir", "elv-link"]
    )


def test_start_time_survives_a_command_name_with_spaces_and_parens(tmp_path: Path) -> None:
    # /proc/PID/stat's second field is the command name, which may hold ") (".
    exe = tmp_path / "a) (b c"
    exe.symlink_to(sys.executable)
    p = subprocess.Popen([str(exe), "-c", "import time; time.sleep(30)"])
    try:
        token = procs.token(p.pid)
        pid, start = token.split()
        assert pid == str(p.pid) and start.isdigit() and start != "None"
    finally:
        p.kill()
        p.wait()


def _cluster_state(root: Path, pids: list[int]) -> None:
    root.mkdir()
    procs = {f"p{i}": {"name": f"p{i}", "pid": pid, "log": "x"} for i, pid in enumerate(pids)}
    state = {"version": 2, "root": str(root), "tag": "t", "gateway": "", "nodes": [], "ports": {}, "before": {}}
    state["procs"] = procs
    (root / "state.json").write_text(json.dumps(state))


def test_a_cluster_is_stale_once_none_of_its_processes_runs(tmp_path: Path) -> None:
    live_root = tmp_path / "elv-k8s-live"
    env = {**os.environ, "HOME": str(live_root)}
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        _cluster_state(live_root, [_dead_pid(), p.pid])
        # A live pid that is not the cluster's (another HOME) does not keep it alive.
        _cluster_state(tmp_path / "elv-k8s-dead", [_dead_pid(), os.getpid()])
        (tmp_path / "elv-k8s-nostate").mkdir()
        # One of an older format (another checkout's) is left to that checkout.
        (tmp_path / "elv-k8s-old").mkdir()
        (tmp_path / "elv-k8s-old" / "state.json").write_text(json.dumps({"root": "x", "procs": {}}))
        assert [c.root for c in reap.stale_clusters(str(tmp_path))] == [str(tmp_path / "elv-k8s-dead")]
    finally:
        p.kill()
        p.wait()


def test_loop_devices_over_a_removed_scratch_dir_are_orphans(tmp_path: Path) -> None:
    from csi.host.loop import LoopDevice

    live = scratch.make("it", root=str(tmp_path))
    gone = str(tmp_path / "elv-it-gone1234")
    attached = [
        LoopDevice("loop0", f"{gone}/img", deleted=True, direct_io=False),
        LoopDevice("loop1", "/dev/loop0", deleted=False, direct_io=False),  # a read-only view over it
        LoopDevice("loop2", f"{live}/pool/v.img", deleted=False, direct_io=False),
        LoopDevice("loop3", "/var/lib/elv/loop/volumes/v.img", deleted=False, direct_io=False),
        LoopDevice("loop4", f"{tmp_path}/elv-x", deleted=True, direct_io=False),  # a file, not a directory
    ]
    found = [d.name for d in scratch.orphan_loops(str(tmp_path), attached)]
    assert found == ["loop1", "loop0", "loop4"]
