"""The cluster layer: a real one-node Kubernetes cluster of host processes.

One cluster per session (tests/k8s/cluster.py). It needs root, the binaries
from scripts/k8s-tools and the packages from scripts/setup-k8s; without them
the tests FAIL, they never skip. The e2e subset (test_e2e.py) is opt-in:
it is deselected unless ELV_E2E=1.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.k8s.cluster import REPO, Cluster, ClusterError, missing_prerequisites, new_root

SUMMARY = os.path.join(REPO, "ci-out", "k8s-summary.json")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: the Kubernetes storage e2e subset (opt-in: ELV_E2E=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        if "tests/k8s/" not in item.nodeid.replace(os.sep, "/"):
            keep.append(item)
            continue
        item.add_marker(pytest.mark.root)
        if item.get_closest_marker("e2e") and os.environ.get("ELV_E2E") != "1":
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


class Summary:
    """Timings and results, written to ci-out/k8s-summary.json at the end."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.t0 = time.monotonic()

    def write(self) -> None:
        self.data["total_s"] = round(time.monotonic() - self.t0, 2)
        os.makedirs(os.path.dirname(SUMMARY), exist_ok=True)
        with open(SUMMARY, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        print(f"\nk8s summary ({SUMMARY}):\n{json.dumps(self.data, indent=1, sort_keys=True)}")


@pytest.fixture(scope="session")
def summary() -> Iterator[Summary]:
    s = Summary()
    yield s
    s.write()


@pytest.fixture(scope="session")
def cluster(summary: Summary) -> Iterator[Cluster]:
    missing = missing_prerequisites()
    if missing:
        pytest.fail("the cluster test needs:\n  " + "\n  ".join(missing), pytrace=False)
    c = Cluster(new_root())
    try:
        try:
            c.up()
        except ClusterError as e:
            logs = "\n".join(f"--- {n}\n{c.tail(n, 1500)}" for n in c.procs)
            pytest.fail(f"cluster did not come up: {e}\n{logs}", pytrace=False)
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
