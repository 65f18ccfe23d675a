"""The driver's work through the Kubernetes API (csi.kube), over an in-memory
API: a ControllerModifyVolume handed from one node's driver to another's and
answered, the refusals, and the claiming of snapshot contents."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from csi.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from csi.kube import protocol as p
from csi.kube.agent import GROUP, GROUP_CLASS, SNAPSHOT, KubeAgent

DRIVER = "elv.csi.dev"


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


class FakeKube:
    """PVs, Nodes and custom objects in memory; a patch of a PV is handed to
    the agents that watch it (what a watch event would do)."""

    def __init__(self) -> None:
        self.pvs: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.custom: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.watchers: list[KubeAgent] = []
        self.lock = threading.Lock()

    def add_pv(self, name: str, handle: str, node: str) -> None:
        term = {"matchExpressions": [{"key": f"topology.{DRIVER}/node", "operator": "In", "values": [node]}]}
        self.pvs[name] = {
            "metadata": {"name": name},
            "spec": {
                "csi": {"driver": DRIVER, "volumeHandle": handle},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [term]}},
            },
        }

    def list_pvs(self, selector: str = "") -> tuple[list[dict[str, Any]], str]:
        return [copy.deepcopy(x) for x in self.pvs.values()], "1"

    def get_pv(self, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.pvs.get(name))

    def patch_pv(self, name: str, body: dict[str, Any]) -> None:
        with self.lock:
            merge(self.pvs[name], body)
            pv = copy.deepcopy(self.pvs[name])
        label = pv["metadata"].get("labels", {}).get(p.NODE_LABEL)
        for a in self.watchers:
            if label == p.label_value(a.node):
                threading.Thread(target=a.handle_pv, args=(pv,)).start()

    def get_node(self, name: str) -> dict[str, Any] | None:
        return self.nodes.get(name)

    def watch_pvs(self, selector: str, rv: str, timeout: int) -> Iterator[tuple[str, dict[str, Any]]]:
        return iter(())

    def list_custom(self, kind: Any, selector: str = "") -> tuple[list[dict[str, Any]], str]:
        return [copy.deepcopy(v) for (k, _), v in self.custom.items() if k == kind], "1"

    def watch_custom(self, kind: Any, selector: str, rv: str, timeout: int) -> Iterator[tuple[str, dict[str, Any]]]:
        return iter(())

    def patch_custom(self, kind: Any, name: str, body: dict[str, Any]) -> None:
        merge(self.custom[(kind, name)], body)

    def create_custom(self, kind: Any, body: dict[str, Any]) -> bool:
        key = (kind, body["metadata"]["name"])
        if key in self.custom:
            return False
        self.custom[key] = copy.deepcopy(body)
        return True


class Node:
    """One node's driver as the agent sees it: its volumes, what it applied."""

    def __init__(self, kube: FakeKube, name: str, volumes: set[str], fail: Exception | None = None) -> None:
        self.volumes = volumes
        self.applied: list[tuple[str, dict[str, str]]] = []
        self.fail = fail
        self.agent = KubeAgent(kube, name, DRIVER, timeout=5, poll=0.01)
        kube.nodes[name] = {"metadata": {"name": name, "uid": f"uid-{name}"}}

    async def apply(self, vid: str, params: dict[str, str]) -> None:
        if vid not in self.volumes:
            raise NotFound(f"volume {vid} does not exist")
        if self.fail:
            raise self.fail
        self.applied.append((vid, params))

    async def owns(self, kind: str, oid: str) -> bool:
        return oid in self.volumes


@pytest.fixture
def kube() -> FakeKube:
    k = FakeKube()
    k.add_pv("pv-a", "v-a", "node-a")
    k.add_pv("pv-b", "v-b", "node-b")
    return k


@pytest.fixture
async def nodes(kube: FakeKube) -> dict[str, Node]:
    loop = asyncio.get_running_loop()
    out = {"node-a": Node(kube, "node-a", {"v-a"}), "node-b": Node(kube, "node-b", {"v-b"})}
    for n in out.values():
        n.agent._loop, n.agent._apply, n.agent._owns = loop, n.apply, n.owns
        kube.watchers.append(n.agent)
    return out


async def test_a_volume_of_another_node_is_changed_by_that_nodes_driver(kube: FakeKube, nodes: dict[str, Node]) -> None:
    await nodes["node-a"].agent.modify("v-b", {"elv.csi.dev/provisioning": "thick"})
    assert nodes["node-b"].applied == [("v-b", {"elv.csi.dev/provisioning": "thick"})]
    assert nodes["node-a"].applied == []
    # The exchange leaves nothing on the PV.
    meta = kube.pvs["pv-b"]["metadata"]
    assert not meta.get("annotations") and not meta.get("labels")


async def test_the_owners_error_is_the_answer(kube: FakeKube, nodes: dict[str, Node]) -> None:
    nodes["node-b"].fail = InvalidArgument("mutable_parameters elv.csi.dev/provisioning='x' is not one of: thick, thin")
    with pytest.raises(InvalidArgument) as e:
        await nodes["node-a"].agent.modify("v-b", {"elv.csi.dev/provisioning": "x"})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message.startswith("on node node-b: mutable_parameters")


async def test_no_pv_is_not_found_and_a_gone_node_is_a_precondition(kube: FakeKube, nodes: dict[str, Node]) -> None:
    with pytest.raises(NotFound):
        await nodes["node-a"].agent.modify("v-none", {})
    del kube.nodes["node-b"]
    with pytest.raises(FailedPrecondition, match="node-b, which has left the cluster"):
        await nodes["node-a"].agent.modify("v-b", {})
    assert nodes["node-b"].applied == []


async def test_a_silent_owner_is_unavailable_which_the_resizer_retries(kube: FakeKube, nodes: dict[str, Node]) -> None:
    kube.watchers.remove(nodes["node-b"].agent)
    nodes["node-a"].agent.timeout = 0.2
    with pytest.raises(Unavailable, match="did not answer"):
        await nodes["node-a"].agent.modify("v-b", {})


async def test_a_request_is_applied_once_and_a_forged_one_never(kube: FakeKube, nodes: dict[str, Node]) -> None:
    b = nodes["node-b"]
    req = p.ModifyRequest("r1", "v-b", {"elv.csi.dev/provisioning": "thick"}, "node-a")
    merge(kube.pvs["pv-b"], p.request_patch(req, "node-b"))
    await asyncio.to_thread(b.agent.handle_pv, kube.get_pv("pv-b"))
    await asyncio.to_thread(b.agent.handle_pv, kube.get_pv("pv-b"))  # answered already
    assert len(b.applied) == 1
    assert p.ModifyResult.parse(kube.pvs["pv-b"]["metadata"]["annotations"][p.RESULT]) == p.ModifyResult("r1", "OK")
    # A request naming another volume than its PV's, or a PV of another node: refused.
    forged = p.ModifyRequest("r2", "v-a", {}, "node-a")
    merge(kube.pvs["pv-b"], p.request_patch(forged, "node-b"))
    await asyncio.to_thread(b.agent.handle_pv, kube.get_pv("pv-b"))
    merge(kube.pvs["pv-a"], p.request_patch(p.ModifyRequest("r3", "v-a", {}, "node-a"), "node-b"))
    await asyncio.to_thread(b.agent.handle_pv, kube.get_pv("pv-a"))
    assert len(b.applied) == 1
    assert json.loads(kube.pvs["pv-a"]["metadata"]["annotations"][p.RESULT])["code"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "text",
    ["", "[]", "{}", '{"id": "1", "volume": "v", "sender": "s", "parameters": {"k": 1}}', "x" * 9000],
)
def test_bad_requests_do_not_parse(text: str) -> None:
    with pytest.raises(InvalidArgument):
        p.ModifyRequest.parse(text)


def test_label_values() -> None:
    assert p.label_value("elv-n1") == "elv-n1"
    long = "n" * 100 + ".example.com"
    assert p.label_value(long).startswith("h-") and len(p.label_value(long)) <= 63


async def test_contents_are_claimed_by_the_node_that_holds_their_volumes(
    kube: FakeKube, nodes: dict[str, Node]
) -> None:
    def content(name: str, **source: Any) -> dict[str, Any]:
        return {"metadata": {"name": name}, "spec": {"driver": DRIVER, "source": source}}

    kube.custom[(GROUP, "g1")] = content("g1", volumeHandles=["v-b"])
    kube.custom[(GROUP, "g2")] = content("g2", volumeHandles=["v-a", "v-b"])  # spans two nodes
    kube.custom[(SNAPSHOT, "m1")] = content("m1", volumeHandle="v-b")
    other = content("x", volumeHandle="v-b")
    other["spec"]["driver"] = "other.csi"
    kube.custom[(SNAPSHOT, "x")] = other
    for kind, name in [(GROUP, "g1"), (GROUP, "g2"), (SNAPSHOT, "m1"), (SNAPSHOT, "x")]:
        for n in nodes.values():
            await asyncio.to_thread(n.agent.handle_content, kind, kube.custom[(kind, name)])
    labels = {k[1]: v["metadata"].get("labels", {}).get(p.MANAGED_BY) for k, v in kube.custom.items()}
    assert labels == {"g1": "node-b", "g2": None, "m1": "node-b", "x": None}


async def test_each_node_keeps_its_own_group_snapshot_class(kube: FakeKube, nodes: dict[str, Node]) -> None:
    for n in nodes.values():
        await asyncio.to_thread(n.agent.ensure_group_class)
        await asyncio.to_thread(n.agent.ensure_group_class)  # there already: fine
    cls = kube.custom[(GROUP_CLASS, "elv-group-snapshots-node-b")]
    assert cls["metadata"]["labels"][p.MANAGED_BY] == "node-b"
    assert cls["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": "node-b", "uid": "uid-node-b"}
    ]
    assert cls["driver"] == DRIVER and cls["deletionPolicy"] == "Delete"
