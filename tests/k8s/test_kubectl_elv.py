"""kubectl-elv against the real cluster: the volume of a bound PVC with its use
(from the kubelet's stats, which come from NodeGetVolumeStats), and an orphan
volume no PersistentVolume points to."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.support.cluster import Cluster, wait_for
from tests.support.k8s import phase, pod, pvc
from tests.support.paths import REPO

NS = "elv-kubectl"
V1 = f"/api/v1/namespaces/{NS}"


def kubectl_elv(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "csi.cmd.kubectl",
        *args,
        "--kubeconfig",
        cluster.kubeconfig,
        "--endpoint",
        f"{cluster.node}=unix://{cluster.csi_socket}",
        "-o",
        "json",
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)


def elv(cluster: Cluster, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "csi", *args, "--endpoint", f"unix://{cluster.csi_socket}"],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=REPO,
    )


def test_kubectl_elv_lists_volumes_and_orphans(cluster: Cluster) -> None:
    api = cluster.api()
    if api.maybe(f"/api/v1/namespaces/{NS}") is None:
        api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        wait_for("default ServiceAccount", lambda: api.maybe(f"{V1}/serviceaccounts/default"), 60)
    api.create(f"{V1}/persistentvolumeclaims", pvc("listed", "300Mi"))
    api.create(f"{V1}/pods", pod("lister", "listed"))
    try:
        wait_for("the pod to run", lambda: phase(api, f"{V1}/pods/lister") == "Running", 120, 0.2)

        def row() -> dict[str, Any] | None:
            r = kubectl_elv(cluster, "volumes")
            assert r.returncode == 0, r.stderr
            rows = [x for x in json.loads(r.stdout) if x["pvc"] == f"{NS}/listed"]
            return rows[0] if rows and rows[0]["used"] is not None else None

        got = wait_for("kubectl-elv to show the PVC's volume with its use", row, 90, 1.0)
        assert got["node"] == cluster.node and got["problem"] == "" and got["condition"] == "ok"
        assert got["size"] >= 300 * 2**20 and 0 < got["used"] < got["size"]
        # A volume made outside Kubernetes is an orphan to the cluster.
        elv(cluster, "volume", "create", "stray", "--size", "32Mi")
        r = kubectl_elv(cluster, "orphans")
        assert r.returncode == 1, "orphans found: exit status 1"
        orphans = json.loads(r.stdout)
        assert [o["name"] for o in orphans] == ["stray"]
        assert orphans[0]["problem"] == "orphan: no PersistentVolume"
        elv(cluster, "volume", "delete", "stray")
        r = kubectl_elv(cluster, "orphans")
        assert r.returncode == 0 and json.loads(r.stdout) == []
    finally:
        api.delete(f"{V1}/pods/lister")
        wait_for("the pod to go", lambda: api.maybe(f"{V1}/pods/lister") is None, 120)
        api.delete(f"{V1}/persistentvolumeclaims/listed")
        wait_for(
            "its volume to go",
            lambda: (
                not [
                    pv
                    for pv in api.get("/api/v1/persistentvolumes")["items"]
                    if (pv["spec"].get("claimRef") or {}).get("name") == "listed"
                ]
            ),
            120,
        )
        api.delete(f"/api/v1/namespaces/{NS}")
