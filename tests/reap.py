"""Remove what an earlier, killed test run left on this machine.

A test run that is SIGKILLed (a cancelled CI job, a session that ends) cannot
clean up, and its leftovers break the next run: a test cluster's bridge, its
nodes' namespaces, processes, pool loop devices, cgroups and veths, and mounts
and loop devices. scripts/test runs this first. It touches only what is stale:
scratch directories whose owner process is gone (csi/host/scratch.py), test
clusters none of whose processes still run, and what engine test runs whose
owner is gone left outside their scratch directory (tests/support/engines.py:
their daemons and containers, cgroups, plugin sockets, throwaway users).

    python -m tests.reap          reap, print what was removed; exit 1 if something could not be
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from csi.host import scratch

if TYPE_CHECKING:
    from tests.support.cluster import Cluster

K8S_PREFIX = "elv-k8s-"


def _runs_in(pid: int, root: str) -> bool:
    """Whether ``pid`` is a live process that a cluster at ``root`` started (they all get HOME=root)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return f"HOME={root}".encode() in env


def stale_clusters(root: str = scratch.ROOT) -> list[Cluster]:
    """Test clusters none of whose processes run any more. A cluster's nodes
    (namespaces, loop devices, cgroups, veths) and its bridge are in its state
    file, so down() removes them too. A cluster of an older state format
    (made by an older checkout) is that checkout's to remove, and is left."""
    from tests.support.cluster import Cluster, ClusterError

    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not name.startswith(K8S_PREFIX) or not os.path.isfile(os.path.join(path, "state.json")):
            continue
        try:
            c = Cluster.load(path)
        except (ClusterError, KeyError, ValueError, TypeError) as e:
            print(f"reap: leaving {path}: {e}", file=sys.stderr)
            continue
        if not any(_runs_in(p.pid, c.root) for p in c.procs.values()):
            out.append(c)
    return out


def main() -> int:
    problems: list[str] = []
    for c in stale_clusters():
        left = c.down()
        print(f"reap: test cluster {c.root} (its processes were gone)" + (f"; left: {left}" if left else ""))
        problems += left
    from tests.support import engines

    for line in engines.reap():
        print(f"reap: {line}")
    removed, failed = scratch.reap()
    for path in removed:
        print(f"reap: scratch directory {path} (its owner was gone)")
    for path in failed:
        print(f"reap: could not remove {path}: something is still mounted there", file=sys.stderr)
    return 1 if problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
