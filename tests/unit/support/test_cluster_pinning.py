"""Cluster.pods_only_on (tests/support/cluster.py) without a cluster: the taints
that keep the e2e subset's pods on one node, and that they always go again.

The e2e spec "restoring snapshot to larger size pvc" makes its restored
claim's pod with no node selection; with all nodes open the scheduler never
picked the snapshot's node (it scores that busier node lower), so the
subset's pods must be kept off the other nodes by the cluster itself."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.cluster import ELSEWHERE_TAINT, Cluster


class Kubectl:
    """Records `kubectl taint` calls and keeps the taints they leave per node."""

    def __init__(self, fail_on: str = "") -> None:
        self.taints: dict[str, set[str]] = {}
        self.fail_on = fail_on

    def __call__(self, *args: str, check: bool = True, **_: object) -> subprocess.CompletedProcess[str]:
        assert args[:2] == ("taint", "node"), args
        node, spec = args[2], args[3]
        if spec.endswith("-"):
            gone = spec[:-1]
            had = {t for t in self.taints.get(node, set()) if t.split("=")[0] + ":" + t.split(":")[-1] == gone}
            if not had and check:
                raise subprocess.CalledProcessError(1, ["kubectl", *args])
            self.taints[node] = self.taints.get(node, set()) - had
        else:
            if node == self.fail_on:
                raise subprocess.CalledProcessError(1, ["kubectl", *args])
            assert "--overwrite" in args
            self.taints.setdefault(node, set()).add(spec)
        return subprocess.CompletedProcess(["kubectl", *args], 0, "", "")

    def on(self) -> dict[str, set[str]]:
        return {n: t for n, t in self.taints.items() if t}


def cluster(tmp_path: Path, kubectl: Kubectl, nodes: int = 3) -> Cluster:
    c = Cluster(str(tmp_path / "elv-k8s-abcd1234"))
    c.nodes = [SimpleNamespace(name=f"elv-n{i}") for i in range(1, nodes + 1)]  # type: ignore[misc]
    c.kubectl = kubectl  # type: ignore[method-assign]
    return c


def test_every_other_node_is_tainted_no_schedule_while_it_lasts(tmp_path: Path) -> None:
    k = Kubectl()
    c = cluster(tmp_path, k)
    with c.pods_only_on("elv-n1"):
        taint = f"{ELSEWHERE_TAINT}=elv-n1:NoSchedule"
        assert k.on() == {"elv-n2": {taint}, "elv-n3": {taint}}
    assert k.on() == {}


def test_the_taints_go_when_the_run_fails(tmp_path: Path) -> None:
    k = Kubectl()
    c = cluster(tmp_path, k)
    with pytest.raises(RuntimeError, match=r"e2e\.test died"), c.pods_only_on("elv-n1"):
        assert k.on()
        raise RuntimeError("e2e.test died")
    assert k.on() == {}


def test_a_taint_that_fails_undoes_the_others_and_is_reported(tmp_path: Path) -> None:
    k = Kubectl(fail_on="elv-n3")
    c = cluster(tmp_path, k)
    with pytest.raises(subprocess.CalledProcessError), c.pods_only_on("elv-n1"):
        pytest.fail("the body must not run with a node left open")
    assert k.on() == {}


def test_one_node_gets_no_taint_and_an_unknown_node_is_refused(tmp_path: Path) -> None:
    k = Kubectl()
    c = cluster(tmp_path, k, nodes=1)
    with c.pods_only_on("elv-n1"):
        assert k.on() == {}
    with pytest.raises(AssertionError, match="no node elv-n9"), c.pods_only_on("elv-n9"):
        pass
