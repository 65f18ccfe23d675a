"""kubectl elv: joining PVs, node inventories and kubelet usage (pure)."""

from __future__ import annotations

from typing import Any

from csi.cmd.kubectl import join, pv_node, usage_from_summary


def pv(name: str, handle: str, node: str, claim: tuple[str, str] | None = ("default", "data")) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "csi": {"driver": "elv.csi.dev", "volumeHandle": handle},
        "capacity": {"storage": "1Gi"},
        "nodeAffinity": {
            "required": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "topology.elv.csi.dev/node", "operator": "In", "values": [node]}]}
                ]
            }
        },
    }
    if claim:
        spec["claimRef"] = {"namespace": claim[0], "name": claim[1]}
    return {"metadata": {"name": name}, "spec": spec}


def test_pv_node_reads_our_topology_key() -> None:
    assert pv_node(pv("p", "v", "n1"), "elv.csi.dev") == "n1"
    assert pv_node({"spec": {}}, "elv.csi.dev") == ""


def test_join_finds_healthy_orphan_and_lost_volumes() -> None:
    pvs = [
        pv("pv-a", "v-loop-a", "n1"),
        pv("pv-lost", "v-loop-gone", "n1", ("default", "lost")),
        pv("pv-other", "v-loop-x", "n9", None),  # on a node not inspected
        {"metadata": {"name": "nfs"}, "spec": {"csi": {"driver": "nfs.csi.k8s.io", "volumeHandle": "v-loop-orph"}}},
    ]
    inv = {
        "n1": [
            {"id": "v-loop-a", "name": "pv-a", "size": 2**30, "condition": "ok"},
            {"id": "v-loop-orph", "name": "leak", "size": 2**20, "condition": "ok"},
        ]
    }
    usage = {"n1": {"default/data": 12345}}
    rows = {r.volume_id: r for r in join(pvs, inv, usage)}
    assert (rows["v-loop-a"].pvc, rows["v-loop-a"].used, rows["v-loop-a"].problem) == ("default/data", 12345, "")
    assert rows["v-loop-orph"].problem == "orphan: no PersistentVolume"  # another driver's PV does not count
    assert rows["v-loop-gone"].problem == "lost: volume missing on its node"
    assert rows["v-loop-gone"].size == 2**30
    assert rows["v-loop-x"].problem == "node not inspected"


def test_usage_from_kubelet_summary() -> None:
    summary = {
        "pods": [
            {
                "volume": [
                    {"name": "v", "usedBytes": 42, "pvcRef": {"namespace": "ns", "name": "c"}},
                    {"name": "cfg", "usedBytes": 1},
                ]
            }
        ]
    }
    assert usage_from_summary(summary) == {"ns/c": 42}
