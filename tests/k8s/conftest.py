"""The cluster layer: a real Kubernetes cluster of several nodes on this machine.

One cluster per session (tests/support/cluster.py): 3 nodes, or ELV_K8S_NODES.
The node plugin runs from the image scripts/build-image builds, as the
DaemonSet of deploy/overlays/loop. It needs root, the binaries from
scripts/k8s-tools and the packages from scripts/setup-k8s; without them the
tests FAIL, they never skip. The e2e subset (test_e2e.py) is opt-in: it is
deselected unless ELV_E2E=1. ELV_K8S_ROOT=ROOT runs the tests on a cluster that
`scripts/k8s-cluster up` started (and leaves it up).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, ClusterError, missing_prerequisites, new_root
from tests.support.k8s import Summary
from tests.support.markers import mark_folder

HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: the Kubernetes storage e2e subset (opt-in: ELV_E2E=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_folder(items, HERE, pytest.mark.root)
    if os.environ.get("ELV_E2E") == "1":
        return
    drop = [i for i in items if i.path.is_relative_to(HERE) and i.get_closest_marker("e2e")]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [i for i in items if all(i is not d for d in drop)]


@pytest.fixture(scope="session")
def summary() -> Iterator[Summary]:
    s = Summary()
    yield s
    s.write()


@pytest.fixture(scope="session")
def cluster(summary: Summary) -> Iterator[Cluster]:
    if os.environ.get("ELV_K8S_ROOT"):
        # A developer's cluster from `scripts/k8s-cluster up` (it stays up).
        yield Cluster.load(os.environ["ELV_K8S_ROOT"])
        return
    missing = missing_prerequisites()
    if missing:
        pytest.fail("the cluster test needs:\n  " + "\n  ".join(missing), pytrace=False)
    c = Cluster(new_root(), int(os.environ.get("ELV_K8S_NODES", "3")))
    try:
        try:
            c.up()
        except ClusterError as e:
            logs = "\n".join(f"--- {n}\n{c.tail(n, 1500)}" for n in c.procs)
            if c.alive("kube-apiserver"):
                logs += "\n" + c.diagnose()
            pytest.fail(f"cluster did not come up: {e}\n{logs}", pytrace=False)
        summary.data["nodes"] = [n.name for n in c.nodes]
        summary.data["cluster_up_s"] = c.timings.get("up")
        summary.data["cluster_up_steps_s"] = {k: v for k, v in c.timings.items() if k != "up"}
        yield c
    finally:
        t = time.monotonic()
        left = c.down()
        summary.data["cluster_down_s"] = round(time.monotonic() - t, 2)
        summary.data["left_behind"] = left
        if left:
            pytest.fail("the cluster left behind:\n  " + "\n  ".join(left), pytrace=False)
