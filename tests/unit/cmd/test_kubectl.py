"""kubectl elv: joining PVs, node inventories and kubelet usage (pure)."""

from __future__ import annotations

from typing import Any

from csi.cmd.kubectl import PROVISIONER_FINALIZER, forget_plan, join, pv_node, usage_from_summary, without_finalizer


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


def test_a_pv_of_a_gone_node_is_lost_and_names_the_command() -> None:
    pvs = [pv("pv-a", "v-a", "n1"), pv("pv-b", "v-b", "gone", ("default", "b"))]
    inv = {"n1": [{"id": "v-a", "name": "pv-a", "size": 2**30, "condition": "ok"}]}
    rows = {r.volume_id: r for r in join(pvs, inv, {}, nodes=["n1"])}
    assert rows["v-a"].problem == ""
    assert rows["v-b"].problem == "lost: node gone (kubectl elv forget-node gone)"
    assert rows["v-b"].node == "gone" and rows["v-b"].pvc == "default/b"
    # Without the node list (older callers), the node is merely not inspected.
    assert {r.volume_id: r for r in join(pvs, inv, {})}["v-b"].problem == "node not inspected"


def test_forget_plan_takes_only_the_gone_nodes_pvs_of_this_driver() -> None:
    other_driver = pv("pv-nfs", "h", "gone")
    other_driver["spec"]["csi"]["driver"] = "nfs.csi.k8s.io"
    pvs = [
        pv("pv-b", "v-b", "gone", ("ns", "b")),
        pv("pv-c", "v-c", "gone", None),
        pv("pv-a", "v-a", "n1"),
        other_driver,
    ]
    plan = forget_plan(pvs, "gone")
    assert [(f.pv, f.claim_namespace, f.claim) for f in plan] == [("pv-b", "ns", "b"), ("pv-c", "", "")]
    assert without_finalizer([PROVISIONER_FINALIZER, "kubernetes.io/pv-protection"], PROVISIONER_FINALIZER) == [
        "kubernetes.io/pv-protection"
    ]
