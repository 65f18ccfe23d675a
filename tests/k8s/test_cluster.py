"""ELV as users run it: a cluster of several nodes, the real image, the
DaemonSet of deploy/overlays/loop as real pods on every node.

The tests run in this order and share the cluster (and, where said, what an
earlier one made); each step is asserted and timed (ci-out/k8s-summary.json):

 1. the driver's pod runs on every node; every node has its CSINode and a
    CSIStorageCapacity per StorageClass (0 for the lvm classes on loop nodes);
 *. 30 PVCs and pods at once, across the nodes: time until all run (a figure);
 2. a PVC and a pod pinned to each node: each binds on its node (the PV's
    node affinity names it, the volume file is in that node's pool only) and
    writes data;
 3. capacity-aware scheduling: one node filled, an unpinned pod lands where
    there is room; a PVC bigger than any node's free space stays Pending with
    an event that says why, and nothing is made anywhere;
 4. online expansion of the volume on every node (the resizer's leader is on
    one of them only), seen by df in the pod;
 5. a VolumeAttributesClass change on a volume of a node the resizer's leader
    is not on (ControllerModifyVolume, routed to the owning node's driver);
 6. snapshot and restore on every node, and a VolumeGroupSnapshot of two
    PVCs on one node, from Kubernetes objects;
 U. user namespaces, on the node that runs containerd v2 and runc 1.3+ (the
    others run Debian's 1.6 and 1.1): only it reports support; a pod with
    hostUsers: false is refused on a Debian node, and a raw block volume in
    one by the API; on it, a hostUsers: false pod's root writes to an ELV
    volume through an idmapped mount and the file is uid 0 on disk while the
    pod runs as an unprivileged host uid; a pod with no root at all
    (runAsNonRoot, uid 1000, fsGroup) writes to a fresh volume and to one
    restored from its snapshot, each file 1000:fsGroup on disk;
 7. the driver restarted under load (its pod deleted; the DaemonSet rolled to
    a new image tag) while a pod writes: the writes go on, nothing is
    remounted or reformatted, new volumes work once the driver is back;
 8. a node goes away (kubelet stopped, Node deleted): `kubectl elv` reports
    its volumes as lost, and `kubectl elv forget-node` frees its PVCs and PVs
    without touching the other nodes' volumes;
 9. everything deleted: nothing is left on any node.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.cluster import DRIVER, NAMESPACE, Api, ApiError, Cluster, ClusterError, Node, kustomize, wait_for
from tests.support.k8s import (
    GROUPSNAP,
    NS,
    SC,
    SNAP,
    V1,
    MiB,
    Steps,
    Summary,
    capacities,
    create_and_time,
    csi_mounts,
    delete_claims,
    delete_pods,
    df_kib,
    events,
    exec_,
    node_state,
    parse_id_map,
    pod,
    pool_files,
    processes_in_userns,
    published_dir,
    pv_node,
    pv_of,
    pvc,
    stats,
    volume_image,
    wait_gone,
    wait_running,
)
from tests.support.k8snode import describe
from tests.support.kube import CONTAINERD2_BIN, dump_all, pids_with, run
from tests.support.paths import REPO

CLASSES = ("elv-loop", "elv-lvm-thick", "elv-lvm-thin")
LEASE = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/external-resizer-elv-csi-dev"


@pytest.fixture(scope="module")
def world(cluster: Cluster, summary: Summary) -> dict[str, Any]:
    """The test namespace, and what the steps learn for the later ones."""
    api = cluster.api()
    if api.maybe(f"/api/v1/namespaces/{NS}") is None:
        api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    wait_for("default ServiceAccount in the test namespace", lambda: api.maybe(f"{V1}/serviceaccounts/default"), 60)
    return {"api": api, "steps": Steps(summary), "payload": {}, "summary": summary}


def need_nodes(cluster: Cluster, n: int) -> None:
    assert len(cluster.nodes) >= n, f"this step needs {n} nodes; the cluster has {len(cluster.nodes)} (ELV_K8S_NODES)"


def driver_pod(cluster: Cluster, node: str) -> str:
    pods = [name for name, (n, ready) in cluster.plugin_pods().items() if n == node and ready]
    assert len(pods) == 1, (node, cluster.plugin_pods())
    return pods[0]


def resizer_leader(cluster: Cluster, api: Api) -> str:
    """The node whose csi-resizer holds the lease (the one that acts)."""
    holder = wait_for("a resizer leader", lambda: (api.maybe(LEASE) or {}).get("spec", {}).get("holderIdentity"), 60)
    pods = cluster.plugin_pods()
    for name, (node, _) in pods.items():
        if holder.startswith(name) or name in holder:
            return node
    raise AssertionError(f"lease holder {holder!r} is none of the plugin pods {sorted(pods)}")


# ---------------------------------------------------------------- 1


def test_1_node_plugin_on_every_node(cluster: Cluster, world: dict[str, Any]) -> None:
    api = world["api"]
    names = [n.name for n in cluster.nodes]

    def published() -> bool:
        caps = capacities(api)
        return all((n, c) in caps for n in names for c in CLASSES) and all(caps[(n, SC)] > 0 for n in names)

    world["steps"].run("1. CSIStorageCapacity per class per node", lambda: wait_for("capacities", published, 120, 0.5))
    pods = cluster.plugin_pods()
    assert sorted(n for n, ready in pods.values() if ready) == sorted(names), pods
    for cn in api.get("/apis/storage.k8s.io/v1/csinodes")["items"]:
        (d,) = [d for d in cn["spec"]["drivers"] if d["name"] == DRIVER]
        assert d["nodeID"] == cn["metadata"]["name"] and d["topologyKeys"] == [f"topology.{DRIVER}/node"]
    for name, (node, _) in pods.items():
        # The pod's hostPath /var/lib/kubelet is its node's own directory, not the host's.
        uid = api.get(f"/api/v1/namespaces/{NAMESPACE}/pods/{name}")["metadata"]["uid"]
        assert os.path.isdir(os.path.join(cluster.node(node).kubelet_dir, "pods", uid))
        assert not os.path.exists(os.path.join("/var/lib/kubelet/pods", uid))
    for name, (node, _) in pods.items():
        # elv doctor, inside the built image as the DaemonSet runs it, on its node.
        doctor = cluster.kubectl(
            "exec", "-n", NAMESPACE, name, "-c", "elv", "--", "elv", "doctor", "--endpoint", "unix:///csi/csi.sock",
            check=False,
        )  # fmt: skip
        assert doctor.returncode == 0, f"{node}: elv doctor:\n{doctor.stdout}{doctor.stderr}"
        assert "the driver answers Probe: elv.csi.dev" in doctor.stdout and "no problems found" in doctor.stdout
    caps = capacities(api)
    for n in names:
        # A loop node serves no lvm class: capacity 0 (not an error retried forever).
        assert caps[(n, "elv-lvm-thick")] == 0 and caps[(n, "elv-lvm-thin")] == 0, caps
        assert 3000 * MiB < caps[(n, SC)] <= 4096 * MiB, caps
    assert len(api.get("/apis/storage.k8s.io/v1/namespaces/elv-system/csistoragecapacities")["items"]) == 3 * len(names)
    world["capacity0"] = {n: caps[(n, SC)] for n in names}


# ---------------------------------------------------------------- the figure


def test_thirty_pvcs_and_pods_at_once(cluster: Cluster, world: dict[str, Any]) -> None:
    """30 PVCs and pods (unpinned) created at once: time until each runs."""
    api, count = world["api"], 30
    t0 = time.monotonic()
    for i in range(count):
        api.create(f"{V1}/persistentvolumeclaims", pvc(f"many-{i}", "300Mi"))
        api.create(f"{V1}/pods", pod(f"many-{i}", f"many-{i}"))
    running: dict[str, float] = {}

    def all_running() -> bool:
        for p in api.get(f"{V1}/pods")["items"]:
            name = p["metadata"]["name"]
            if name.startswith("many-") and p["status"].get("phase") == "Running" and name not in running:
                running[name] = time.monotonic() - t0
        return len(running) == count

    wait_for(f"{count} pods running", all_running, 600, 0.2)
    total = time.monotonic() - t0
    per_node: dict[str, int] = {}
    for p in api.get(f"{V1}/pods")["items"]:
        if p["metadata"]["name"].startswith("many-"):
            per_node[p["spec"]["nodeName"]] = per_node.get(p["spec"]["nodeName"], 0) + 1
    world["summary"].data["thirty_pods"] = {
        "pod_to_running_s": stats(list(running.values())),
        "all_running_s": round(total, 2),
        "per_node": per_node,
    }
    print(f"  30 PVCs + pods: all running in {total:.1f} s; {stats(list(running.values()))}; per node {per_node}")
    t = time.monotonic()
    delete_pods(api, *[f"many-{i}" for i in range(count)])
    delete_claims(api, *[f"many-{i}" for i in range(count)])
    world["summary"].data["thirty_pods"]["deleted_s"] = round(time.monotonic() - t, 2)
    for n in cluster.nodes:
        assert not any(node_state(n).values()), (n.name, node_state(n))


# ---------------------------------------------------------------- 2


def test_2_pvc_and_pod_on_every_node(cluster: Cluster, world: dict[str, Any]) -> None:
    api = world["api"]
    lat: dict[str, dict[str, float]] = {}

    def one(n: Node) -> None:
        lat[n.name] = create_and_time(api, pvc(f"data-{n.name}", "300Mi"), pod(f"w-{n.name}", f"data-{n.name}", n.name))
        p = api.get(f"{V1}/pods/w-{n.name}")
        assert p["spec"]["nodeName"] == n.name
        claim = api.get(f"{V1}/persistentvolumeclaims/data-{n.name}")
        assert claim["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == n.name
        pv = pv_of(api, f"data-{n.name}")
        assert pv["spec"]["csi"]["driver"] == DRIVER and pv["spec"]["csi"]["fsType"] == "xfs"
        assert pv_node(pv) == n.name
        vid = pv["spec"]["csi"]["volumeHandle"]
        # The volume lives in this node's pool, and in no other's.
        for other in cluster.nodes:
            assert os.path.exists(volume_image(other, vid)) == (other is n), (vid, other.name)
        payload = secrets.token_hex(16)
        exec_(cluster, f"w-{n.name}", f"echo {payload} > /data/hello && sync")
        assert exec_(cluster, f"w-{n.name}", "stat -c %g /data/hello").strip() == "2000"  # fsGroup applied
        world["payload"][n.name] = payload

    for n in cluster.nodes:
        world["steps"].run(f"2. PVC + pod pinned to {n.name}: bound there, running, data written", lambda n=n: one(n))
    world["summary"].data["per_node_latency_s"] = lat
    for name, x in lat.items():
        print(f"  {name}: PVC-to-Bound {x['pvc_to_bound_s']:.2f} s, pod-to-Running {x['pod_to_running_s']:.2f} s")


# ---------------------------------------------------------------- 3


def test_3_capacity_aware_scheduling(cluster: Cluster, world: dict[str, Any]) -> None:
    need_nodes(cluster, 2)
    api, steps = world["api"], world["steps"]
    full = cluster.nodes[-1]
    cap0 = capacities(api)[(full.name, SC)]
    filler = (cap0 - 150 * MiB) // MiB

    def fill() -> None:
        create_and_time(api, pvc("filler", f"{filler}Mi"), pod("filler", "filler", full.name))
        wait_for(
            f"{full.name}'s capacity below 300Mi",
            lambda: capacities(api)[(full.name, SC)] < 300 * MiB,
            60,
            0.5,
        )

    steps.run(f"3a. {full.name} filled ({filler} MiB)", fill)

    def lands_elsewhere() -> None:
        create_and_time(api, pvc("roomy", "400Mi"), pod("roomy", "roomy"))
        node = api.get(f"{V1}/pods/roomy")["spec"]["nodeName"]
        assert node != full.name, f"the pod went to the full node {node}"
        assert pv_node(pv_of(api, "roomy")) == node

    steps.run("3b. an unpinned pod lands on a node with room", lands_elsewhere)

    def too_big() -> None:
        before = {n.name: pool_files(n) for n in cluster.nodes}
        biggest = max(v for (node, sc), v in capacities(api).items() if sc == SC)
        size = biggest // MiB + 1024
        api.create(f"{V1}/persistentvolumeclaims", pvc("huge", f"{size}Mi"))
        api.create(f"{V1}/pods", pod("huge", "huge"))

        def explained() -> str | None:
            msgs = [m for m in events(api, "huge") if "FailedScheduling" in m]
            return next((m for m in msgs if "enough free storage" in m), None)

        why = wait_for("a FailedScheduling event that says why", explained, 90, 0.5)
        time.sleep(3)  # and nothing happens meanwhile
        assert api.get(f"{V1}/persistentvolumeclaims/huge")["status"]["phase"] == "Pending"
        assert api.get(f"{V1}/pods/huge")["status"]["phase"] == "Pending"
        claim = api.get(f"{V1}/persistentvolumeclaims/huge")
        assert "volume.kubernetes.io/selected-node" not in claim["metadata"].get("annotations", {})
        assert {n.name: pool_files(n) for n in cluster.nodes} == before, "a volume was made somewhere"
        world["summary"].data["too_big_event"] = why

    steps.run("3c. a PVC bigger than any node stays Pending, says why, makes nothing", too_big)
    delete_pods(api, "filler", "roomy", "huge")
    delete_claims(api, "filler", "roomy", "huge")


# ---------------------------------------------------------------- 4


def test_4_online_expansion_on_every_node(cluster: Cluster, world: dict[str, Any]) -> None:
    api = world["api"]
    leader = resizer_leader(cluster, api)
    world["summary"].data["resizer_leader"] = leader

    def grow(n: Node) -> None:
        name = f"w-{n.name}"
        before = df_kib(cluster, name)
        api.patch(
            f"{V1}/persistentvolumeclaims/data-{n.name}", {"spec": {"resources": {"requests": {"storage": "600Mi"}}}}
        )

        def grown() -> bool:
            c = api.get(f"{V1}/persistentvolumeclaims/data-{n.name}")["status"].get("capacity", {}).get("storage")
            return c == "600Mi" and df_kib(cluster, name) > before + 270 * 1024

        wait_for(f"data-{n.name} at 600Mi and a bigger filesystem in the pod", grown, 120, 0.5)
        assert exec_(cluster, name, "cat /data/hello").strip() == world["payload"][n.name]

    for n in cluster.nodes:
        who = "the resizer's leader" if n.name == leader else "not the resizer's leader"
        world["steps"].run(f"4. online expansion on {n.name} ({who}), seen by df", lambda n=n: grow(n))


# ---------------------------------------------------------------- 5


def test_5_volume_attributes_class_on_a_non_leader_node(cluster: Cluster, world: dict[str, Any]) -> None:
    need_nodes(cluster, 2)
    api = world["api"]
    leader = resizer_leader(cluster, api)
    n = next(x for x in cluster.nodes if x.name != leader)
    vac = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "VolumeAttributesClass",
        "metadata": {"name": "elv-thick"},
        "driverName": DRIVER,
        "parameters": {"elv.csi.dev/provisioning": "thick"},
    }
    if api.maybe("/apis/storage.k8s.io/v1/volumeattributesclasses/elv-thick") is None:
        api.create("/apis/storage.k8s.io/v1/volumeattributesclasses", vac)
    vid = pv_of(api, f"data-{n.name}")["spec"]["csi"]["volumeHandle"]
    image = volume_image(n, vid)
    assert os.stat(image).st_blocks * 512 < os.stat(image).st_size // 2, "the volume is not sparse to begin with"

    def modify() -> None:
        api.patch(f"{V1}/persistentvolumeclaims/data-{n.name}", {"spec": {"volumeAttributesClassName": "elv-thick"}})

        def applied() -> bool:
            st = api.get(f"{V1}/persistentvolumeclaims/data-{n.name}")["status"]
            bad = [m for m in events(api, f"data-{n.name}") if "VolumeModifyFailed" in m]
            assert not bad, bad
            return st.get("currentVolumeAttributesClassName") == "elv-thick"

        wait_for(f"data-{n.name} modified to elv-thick", applied, 120, 0.5)

    world["steps"].run(f"5. VolumeAttributesClass thin -> thick on {n.name} (leader: {leader})", modify)
    st = os.stat(image)
    assert st.st_blocks * 512 >= st.st_size, "the backing file is not fully allocated after thin -> thick"
    assert exec_(cluster, f"w-{n.name}", "cat /data/hello").strip() == world["payload"][n.name]


# ---------------------------------------------------------------- 6


def snapshot(name: str, claim: str) -> dict[str, Any]:
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": name},
        "spec": {"volumeSnapshotClassName": "elv-snapshots", "source": {"persistentVolumeClaimName": claim}},
    }


def wait_ready(api: Api, path: str, timeout: float = 120) -> None:
    wait_for(f"{path} readyToUse", lambda: (api.maybe(path) or {}).get("status", {}).get("readyToUse"), timeout, 0.2)


def test_6_snapshot_and_restore_on_every_node(cluster: Cluster, world: dict[str, Any]) -> None:
    api = world["api"]

    def one(n: Node) -> None:
        api.create(SNAP, snapshot(f"snap-{n.name}", f"data-{n.name}"))
        wait_ready(api, f"{SNAP}/snap-{n.name}")
        # A restore is made on the node of its snapshot: its pod goes there
        # (the scheduler cannot know where a snapshot lives).
        create_and_time(
            api,
            pvc(f"restored-{n.name}", "600Mi", source=f"snap-{n.name}"),
            pod(f"r-{n.name}", f"restored-{n.name}", n.name),
        )
        assert pv_node(pv_of(api, f"restored-{n.name}")) == n.name
        assert exec_(cluster, f"r-{n.name}", "cat /data/hello").strip() == world["payload"][n.name]
        exec_(cluster, f"r-{n.name}", "echo changed > /data/hello")
        assert exec_(cluster, f"w-{n.name}", "cat /data/hello").strip() == world["payload"][n.name]

    for n in cluster.nodes:
        world["steps"].run(f"6. snapshot of data-{n.name} restored into a new PVC", lambda n=n: one(n))
    names = [x.name for x in cluster.nodes]
    delete_pods(api, *[f"r-{x}" for x in names])
    delete_claims(api, *[f"restored-{x}" for x in names])
    for x in names:
        api.delete(f"{SNAP}/snap-{x}")
    for x in names:
        wait_gone(api, f"{SNAP}/snap-{x}")


def test_6_group_snapshot_of_two_pvcs_on_one_node(cluster: Cluster, world: dict[str, Any]) -> None:
    api, steps = world["api"], world["steps"]
    n = cluster.nodes[0]
    cls = f"elv-group-snapshots-{n.name}"
    for x in ("ga", "gb"):
        create_and_time(api, pvc(x, "300Mi", labels={"group": "g1"}), pod(x, x, n.name))
        exec_(cluster, x, f"echo {x} > /data/who && sync")

    def group() -> None:
        wait_for(
            f"the driver's group snapshot class {cls}",
            lambda: api.maybe(f"/apis/groupsnapshot.storage.k8s.io/v1/volumegroupsnapshotclasses/{cls}"),
            60,
        )
        api.create(
            GROUPSNAP,
            {
                "apiVersion": "groupsnapshot.storage.k8s.io/v1",
                "kind": "VolumeGroupSnapshot",
                "metadata": {"name": "g1"},
                "spec": {"volumeGroupSnapshotClassName": cls, "source": {"selector": {"matchLabels": {"group": "g1"}}}},
            },
        )
        wait_ready(api, f"{GROUPSNAP}/g1")

    steps.run(f"6. VolumeGroupSnapshot of two PVCs on {n.name}", group)
    # Its members are VolumeSnapshots the group owns.
    uid = api.get(f"{GROUPSNAP}/g1")["metadata"]["uid"]
    members = [
        vs
        for vs in api.get(SNAP)["items"]
        if any(o.get("uid") == uid for o in vs["metadata"].get("ownerReferences") or [])
    ]
    by_claim = {}
    for vs in members:
        wait_ready(api, f"{SNAP}/{vs['metadata']['name']}")
        by_claim[vs["spec"]["source"]["persistentVolumeClaimName"]] = vs["metadata"]["name"]
    assert sorted(by_claim) == ["ga", "gb"], by_claim

    def restore() -> None:
        create_and_time(api, pvc("from-group", "300Mi", source=by_claim["gb"]), pod("from-group", "from-group", n.name))
        assert exec_(cluster, "from-group", "cat /data/who").strip() == "gb"

    steps.run("6. a member of the group restored", restore)
    delete_pods(api, "from-group", "ga", "gb")
    delete_claims(api, "from-group")
    api.delete(f"{GROUPSNAP}/g1")
    wait_gone(api, f"{GROUPSNAP}/g1")

    def contents_gone() -> bool:
        vgsc = api.get("/apis/groupsnapshot.storage.k8s.io/v1/volumegroupsnapshotcontents")["items"]
        vsc = api.get("/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents")["items"]
        return not vgsc and not vsc

    wait_for("group and member snapshot contents deleted", contents_gone, 90, 0.5)
    delete_claims(api, "ga", "gb")
    assert not pool_files(n)["snapshots"] and not pool_files(n)["groups"], pool_files(n)


# ---------------------------------------------------------------- U: user namespaces


#: kubelet gives each user-namespaced pod 65536 IDs (userNamespaces.idsPerPod's
#: default), from a multiple of 65536 at 65536 or above (no `kubelet` user here).
IDS_PER_POD = 65536
#: A pod with no root at all: not in its user namespace, and not on the host.
NON_ROOT = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 3000}
REFUSED_BY_16 = (
    "FailedCreatePodSandBox: Failed to create pod sandbox: "
    "can't set `spec.hostUsers: false`, runtime does not support user namespaces"
)


def userns_node(cluster: Cluster) -> Node:
    """The node that runs containerd v2 and runc 1.3+ (tests/support/cluster.py)."""
    (n,) = [x for x in cluster.nodes if x.containerd2]
    return n


def userns_pod(name: str, claim: str | None, node: str, security: dict[str, Any]) -> dict[str, Any]:
    """pod() in a user namespace of its own (hostUsers: false), with this pod securityContext."""
    p = pod(name, claim or "none", node)
    p["spec"]["hostUsers"] = False
    p["spec"]["securityContext"] = security
    if claim is None:
        del p["spec"]["volumes"], p["spec"]["containers"][0]["volumeMounts"]
    return p


@dataclass
class Inside:
    """What a pod's container says about itself."""

    ns: int  # its user namespace's inode
    uid_map: list[tuple[int, int, int]]
    gid_map: list[tuple[int, int, int]]
    uid: int
    gid: int
    groups: list[int]
    data_options: list[str]  # the per-mount options of /data in its mountinfo
    data_dev: int  # st_dev of /data

    @property
    def base(self) -> int:
        """The host ID its ID 0 is (the single mapping kubelet gives a pod)."""
        ((inside, outside, count),) = self.uid_map
        assert (inside, count) == (0, IDS_PER_POD), self.uid_map
        return outside


def inside(cluster: Cluster, name: str) -> Inside:
    out = exec_(
        cluster, name,
        "readlink /proc/self/ns/user; echo --; cat /proc/self/uid_map; echo --; cat /proc/self/gid_map; echo --;"
        " id -u; id -g; id -G; echo --; grep ' /data ' /proc/self/mountinfo; stat -c %d /data",
    )  # fmt: skip
    ns, uids, gids, ids, data = out.split("--\n")
    uid, gid, groups = ids.split("\n")[:3]
    mount, dev = data.strip().split("\n")
    assert ns.strip().startswith("user:[") and ns.strip().endswith("]"), ns
    return Inside(
        ns=int(ns.strip()[6:-1]),
        uid_map=parse_id_map(uids),
        gid_map=parse_id_map(gids),
        uid=int(uid),
        gid=int(gid),
        groups=sorted(int(g) for g in groups.split()),
        data_options=mount.split()[5].split(","),
        data_dev=int(dev),
    )


def check_mapped(i: Inside, uid: int, gid: int) -> None:
    """From the host: the pod's mapping is kubelet's, and its processes run as
    the host IDs that ``uid``/``gid`` inside map to, none of them root."""
    base = i.base
    assert base >= IDS_PER_POD and base % IDS_PER_POD == 0, i.uid_map
    assert i.gid_map == i.uid_map
    procs = processes_in_userns(i.ns)
    main = [p for p in procs if p.argv == ("sleep", "3600")]
    assert len(main) == 1, procs
    assert main[0].uids == (base + uid,) * 4 and main[0].gids == (base + gid,) * 4, main[0]
    ids = [x for p in procs for x in (*p.uids, *p.gids)]
    assert all(base <= x < base + IDS_PER_POD for x in ids), procs


@contextmanager
def objects(api: Api, pods: list[str], claims: list[str], snapshots: list[str]) -> Iterator[None]:
    """Delete these pods, claims and snapshots at the end, also when the body
    failed (its error is then the one reported)."""
    ok = False
    try:
        yield
        ok = True
    finally:
        try:
            delete_pods(api, *[p for p in pods if api.maybe(f"{V1}/pods/{p}")])
            delete_claims(api, *[c for c in claims if api.maybe(f"{V1}/persistentvolumeclaims/{c}")])
            for s in snapshots:
                api.delete(f"{SNAP}/{s}")
            for s in snapshots:
                wait_gone(api, f"{SNAP}/{s}")
        except Exception:
            if ok:
                raise
            traceback.print_exc()


def on_disk(api: Api, n: Node, pod_name: str, claim: str, i: Inside) -> str:
    """The pod's volume as its node sees it (not idmapped), checked to be the
    filesystem the pod has at /data and a mount point in the node's namespace."""
    uid = api.get(f"{V1}/pods/{pod_name}")["metadata"]["uid"]
    pv = pv_of(api, claim)["metadata"]["name"]
    d = published_dir(n, uid, pv)
    assert os.stat(d).st_dev == i.data_dev, "not the filesystem the pod has at /data"
    assert any(mp == d.removeprefix(n.view("")) for _, mp in csi_mounts(n)), csi_mounts(n)
    return d


def owner(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid


def test_u0_the_user_namespace_node(cluster: Cluster, world: dict[str, Any]) -> None:
    """Only the containerd v2 node says it runs user-namespaced pods, and its
    kubelet has UserNamespacesSupport on (GA and locked on in 1.36)."""
    need_nodes(cluster, 2)
    api, n = world["api"], userns_node(cluster)
    world["steps"].run(
        f"U0. only {n.name} runs containerd v2 and supports user namespaces", lambda: runtimes(cluster, api, n)
    )
    metrics = api.get(f"/api/v1/nodes/{n.name}/proxy/metrics")
    assert 'kubernetes_feature_enabled{name="UserNamespacesSupport",stage=""} 1' in metrics.splitlines(), [
        line for line in metrics.splitlines() if "UserNamespacesSupport" in line
    ]


def runtimes(cluster: Cluster, api: Api, n: Node) -> None:
    """Each node's runtime as its Node reports it, and its containerd and shims' binaries."""
    version = run([os.path.join(CONTAINERD2_BIN, "containerd"), "--version"]).stdout.split()[2]
    assert version.startswith("v2."), version
    nodes = {x["metadata"]["name"]: x["status"] for x in api.get("/api/v1/nodes")["items"]}
    for x in cluster.nodes:
        st = nodes[x.name]
        runtime = st["nodeInfo"]["containerRuntimeVersion"]
        userns = {
            h.get("name", ""): (h.get("features") or {}).get("userNamespaces") for h in st.get("runtimeHandlers") or []
        }
        exe = os.readlink(f"/proc/{cluster.procs[f'containerd@{x.name}'].pid}/exe")
        shims = {
            os.readlink(f"/proc/{p}/exe") for p in pids_with(x.containerd_sock) if "containerd-shim" in describe(p)
        }
        if x is n:
            assert runtime == f"containerd://{version.removeprefix('v')}", runtime
            assert userns == {"": True, "runc": True}, st.get("runtimeHandlers")
            assert exe == os.path.realpath(os.path.join(CONTAINERD2_BIN, "containerd"))
            assert shims == {os.path.realpath(os.path.join(CONTAINERD2_BIN, "containerd-shim-runc-v2"))}, shims
        else:
            assert runtime.startswith("containerd://1.6."), runtime
            assert not any(userns.values()), st.get("runtimeHandlers")
            assert exe == os.path.realpath("/usr/bin/containerd")
            assert shims == {os.path.realpath("/usr/bin/containerd-shim-runc-v2")}, shims


def test_u1_what_user_namespaces_cannot_do(cluster: Cluster, world: dict[str, Any]) -> None:
    """Debian's containerd 1.6 refuses a pod with hostUsers: false (its runc 1.1
    has no idmapped mounts), and the API refuses a raw block volume in one."""
    need_nodes(cluster, 2)
    api, steps = world["api"], world["steps"]
    old = next(x for x in cluster.nodes if not x.containerd2)

    def refused() -> None:
        with objects(api, ["userns-on-16"], [], []):
            api.create(f"{V1}/pods", userns_pod("userns-on-16", None, old.name, {}))
            msg = wait_for(
                "kubelet's refusal",
                lambda: [m for m in events(api, "userns-on-16") if "FailedCreatePodSandBox" in m],
                60,
            )
            assert msg[0] == f"userns-on-16: {REFUSED_BY_16}", msg
            assert api.get(f"{V1}/pods/userns-on-16")["status"]["phase"] == "Pending"

    steps.run(f"U1a. hostUsers: false refused on {old.name} (containerd 1.6, runc 1.1)", refused)
    block = userns_pod("userns-block", None, old.name, {})
    block["spec"]["volumes"] = [{"name": "dev", "persistentVolumeClaim": {"claimName": "userns-block"}}]
    block["spec"]["containers"][0]["volumeDevices"] = [{"name": "dev", "devicePath": "/dev/xvda"}]
    with pytest.raises(ApiError) as e:
        api.create(f"{V1}/pods", block)
    assert e.value.code == 422
    assert "spec.containers[0].volumeDevices: Forbidden: when `hostUsers` is false" in str(e.value), e.value
    assert api.maybe(f"{V1}/pods/userns-block") is None


def test_u2_user_namespaced_pod_root_inside_root_on_disk(cluster: Cluster, world: dict[str, Any]) -> None:
    """hostUsers: false with an ELV volume: root in the pod is an unprivileged
    host uid, and what it writes lands on disk as uid 0: kubelet asks for an
    idmapped mount of every volume with the pod's own mapping, runc 1.3+ makes
    it, so the on-disk owner is the one the pod sees."""
    api, steps, n = world["api"], world["steps"], userns_node(cluster)
    payload = secrets.token_hex(16)

    def root() -> None:
        create_and_time(api, pvc("userns-root", "300Mi"), userns_pod("userns-root", "userns-root", n.name, {}))
        assert api.get(f"{V1}/pods/userns-root")["spec"]["nodeName"] == n.name
        exec_(cluster, "userns-root", f"echo {payload} > /data/by-root && sync")
        assert exec_(cluster, "userns-root", "cat /data/by-root").strip() == payload
        i = inside(cluster, "userns-root")
        assert (i.uid, i.gid, i.groups) == (0, 0, [0]), i
        assert "idmapped" in i.data_options, i.data_options
        check_mapped(i, 0, 0)
        uid = api.get(f"{V1}/pods/userns-root")["metadata"]["uid"]
        with open(os.path.join(n.kubelet_dir, "pods", uid, "userns")) as f:
            mapping = [{"hostId": i.base, "containerId": 0, "length": IDS_PER_POD}]
            assert json.load(f) == {"uidMappings": mapping, "gidMappings": mapping}
        d = on_disk(api, n, "userns-root", "userns-root", i)
        assert owner(d) == (0, 0)  # mkfs's root directory, untouched
        assert owner(f"{d}/by-root") == (0, 0), "root in the pod did not land as root on disk"
        with open(f"{d}/by-root") as f:
            assert f.read().strip() == payload
        assert exec_(cluster, "userns-root", "stat -c '%u %g' /data/by-root").strip() == "0 0"
        world["summary"].data["userns_pod_base"] = i.base

    with objects(api, ["userns-root"], ["userns-root"], []):
        steps.run(
            f"U2. hostUsers: false on {n.name}: root inside is uid 0 on disk, an unprivileged uid on the host", root
        )


def test_u3_no_root_at_all_fresh_and_restored(cluster: Cluster, world: dict[str, Any]) -> None:
    """runAsNonRoot, runAsUser 1000 and fsGroup in a user namespace: root
    neither in the pod nor on the host. It writes to a fresh volume, and a second
    such pod to one restored from its snapshot; the on-disk owners are 1000 and
    the fsGroup."""
    api, steps, n = world["api"], world["steps"], userns_node(cluster)
    payload = secrets.token_hex(16)

    def check(name: str, claim: str) -> str:
        i = inside(cluster, name)
        assert (i.uid, i.gid, i.groups) == (1000, 1000, [1000, 3000]), i
        assert "idmapped" in i.data_options, i.data_options
        check_mapped(i, 1000, 1000)
        return on_disk(api, n, name, claim, i)

    def fresh() -> None:
        create_and_time(api, pvc("nonroot", "300Mi"), userns_pod("nonroot-1", "nonroot", n.name, NON_ROOT))
        d = check("nonroot-1", "nonroot")
        exec_(cluster, "nonroot-1", f"echo {payload} > /data/first && sync")
        assert owner(d)[1] == 3000 and os.stat(d).st_mode & 0o2000, "kubelet's fsGroup on the volume's root"
        assert owner(f"{d}/first") == (1000, 3000)

    def restored() -> None:
        api.create(SNAP, snapshot("nonroot-snap", "nonroot"))
        wait_ready(api, f"{SNAP}/nonroot-snap")
        claim = pvc("nonroot-restored", "300Mi", source="nonroot-snap")
        create_and_time(api, claim, userns_pod("nonroot-2", "nonroot-restored", n.name, NON_ROOT))
        assert pv_node(pv_of(api, "nonroot-restored")) == n.name
        d = check("nonroot-2", "nonroot-restored")
        assert exec_(cluster, "nonroot-2", "cat /data/first").strip() == payload
        exec_(cluster, "nonroot-2", "echo second > /data/second && sync")
        assert owner(f"{d}/first") == (1000, 3000) and owner(f"{d}/second") == (1000, 3000)
        assert exec_(cluster, "nonroot-2", "stat -c '%u %g' /data/first /data/second").split("\n")[:2] == [
            "1000 3000",
            "1000 3000",
        ]

    with objects(api, ["nonroot-1", "nonroot-2"], ["nonroot", "nonroot-restored"], ["nonroot-snap"]):
        steps.run(f"U3a. no root at all (runAsNonRoot, uid 1000, fsGroup) on {n.name}: a fresh volume", fresh)
        steps.run("U3b. ... and one restored from its snapshot", restored)


# ---------------------------------------------------------------- 7


WRITER = "i=0; while true; do i=$((i+1)); echo $i >> /data/log || echo FAIL $i >> /dev/termination-log; sync; sleep 0.1; done"


def test_7_driver_restart_under_load(cluster: Cluster, world: dict[str, Any]) -> None:
    api, steps = world["api"], world["steps"]
    n = cluster.nodes[0]
    create_and_time(api, pvc("busy", "300Mi"), pod("busy", "busy", n.name, ["sh", "-c", WRITER]))
    time.sleep(1)
    mounts = csi_mounts(n)
    assert mounts, "no CSI mount on the node"
    fs_id = exec_(cluster, "busy", "stat -f -c %i /data").strip()

    def lines() -> int:
        return int(exec_(cluster, "busy", "wc -l < /data/log").strip())

    def check_writes_went_on(before: int) -> None:
        wait_for("more writes", lambda: lines() > before + 10, 30, 0.5)
        assert csi_mounts(n) == mounts, "a volume was remounted"
        assert exec_(cluster, "busy", "stat -f -c %i /data").strip() == fs_id, "a different filesystem"
        log = exec_(cluster, "busy", "cat /data/log").split()
        assert log == [str(i) for i in range(1, len(log) + 1)], "the write log has a gap or a repeat"

    def new_volume_works(tag: str) -> None:
        create_and_time(api, pvc(f"after-{tag}", "300Mi"), pod(f"after-{tag}", f"after-{tag}", n.name))
        exec_(cluster, f"after-{tag}", "echo ok > /data/ok && sync")
        delete_pods(api, f"after-{tag}")
        delete_claims(api, f"after-{tag}")

    def restart() -> None:
        before = lines()
        old = driver_pod(cluster, n.name)
        t = time.monotonic()
        api.request("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/{old}")
        wait_for("the driver's new pod ready", lambda: driver_pod_ready(cluster, n.name, old), 180, 0.25)
        world["summary"].data["driver_restart_s"] = round(time.monotonic() - t, 2)
        check_writes_went_on(before)
        new_volume_works("restart")

    steps.run(f"7a. driver pod deleted on {n.name} under load; writes go on; new volumes work", restart)

    def roll() -> None:
        before = lines()
        for x in cluster.nodes:
            cluster.retag_image(x, "elv:0.1.0", "elv:0.1.0-rolled")
        t = time.monotonic()
        ds = f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/elv-node"
        obj = api.get(ds)
        containers = obj["spec"]["template"]["spec"]["containers"]
        patch = [{"name": c["name"], "image": "elv:0.1.0-rolled"} for c in containers if c["name"] == "elv"]
        api.request(
            "PATCH",
            ds,
            {"spec": {"template": {"spec": {"containers": patch}}}},
            "application/strategic-merge-patch+json",
        )

        def rolled() -> bool:
            st = api.get(ds)["status"]
            want = len(cluster.nodes)
            return (
                st.get("updatedNumberScheduled") == want
                and st.get("numberReady") == want
                and st.get("observedGeneration") == api.get(ds)["metadata"]["generation"]
            )

        wait_for("the DaemonSet rolled out on every node", rolled, 300, 0.5)
        world["summary"].data["daemonset_roll_s"] = round(time.monotonic() - t, 2)
        check_writes_went_on(before)
        new_volume_works("roll")

    steps.run("7b. DaemonSet rolled to a new image tag under load", roll)
    assert "FAIL" not in exec_(cluster, "busy", "cat /dev/termination-log || true")
    delete_pods(api, "busy")
    delete_claims(api, "busy")


def driver_pod_ready(cluster: Cluster, node: str, old: str) -> bool:
    pods = cluster.plugin_pods()
    return any(n == node and ready and name != old for name, (n, ready) in pods.items())


# ---------------------------------------------------------------- 8


def kubectl_elv(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """kubectl-elv with its default flags (namespace, selector, container)."""
    argv = [sys.executable, "-m", "csi.cmd.kubectl", *args, "--kubeconfig", cluster.kubeconfig]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=REPO, check=False)


def test_kubectl_elv_lists_every_node_and_orphans(cluster: Cluster, world: dict[str, Any]) -> None:
    api = world["api"]

    def rows() -> list[dict[str, Any]] | None:
        r = kubectl_elv(cluster, "volumes", "-o", "json")
        assert r.returncode == 0, r.stderr
        got = [x for x in json.loads(r.stdout) if x["pvc"].startswith(f"{NS}/data-")]
        return got if len(got) == len(cluster.nodes) and all(x["used"] is not None for x in got) else None

    got = wait_for("kubectl-elv to show every node's volume with its use", rows, 120, 2)
    for row in got:
        assert row["problem"] == "" and row["condition"] == "ok", row
        assert row["pvc"] == f"{NS}/data-{row['node']}"
    # A volume made outside Kubernetes is an orphan to the cluster.
    n = cluster.nodes[0]
    pod_name = driver_pod(cluster, n.name)

    def elv_volume(*args: str) -> None:  # `elv volume` in the node plugin's container
        argv = ["exec", "-n", NAMESPACE, pod_name, "-c", "elv", "--", "elv", "volume", *args]
        cluster.kubectl(*argv, "--endpoint", "unix:///csi/csi.sock")

    elv_volume("create", "stray", "--size", "32Mi")
    r = kubectl_elv(cluster, "orphans", "-o", "json")
    assert r.returncode == 1, "orphans found: exit status 1"
    orphans = json.loads(r.stdout)
    assert [(o["name"], o["node"], o["problem"]) for o in orphans] == [("stray", n.name, "orphan: no PersistentVolume")]
    elv_volume("delete", "stray")
    r = kubectl_elv(cluster, "orphans", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stdout
    del api


def test_8_a_node_goes_away(cluster: Cluster, world: dict[str, Any]) -> None:
    need_nodes(cluster, 2)
    api, steps = world["api"], world["steps"]
    gone = cluster.nodes[-1]
    others = [n for n in cluster.nodes if n is not gone]
    lost_pv = pv_of(api, f"data-{gone.name}")["metadata"]["name"]
    kept = {n.name: pv_of(api, f"data-{n.name}")["metadata"]["name"] for n in others}

    def go() -> None:
        cluster.stop(f"kubelet@{gone.name}")
        cluster.procs[f"stopped:kubelet@{gone.name}"] = cluster.procs.pop(f"kubelet@{gone.name}")
        cluster.save()
        api.delete(f"/api/v1/nodes/{gone.name}")
        wait_gone(api, f"/api/v1/nodes/{gone.name}")

    steps.run(f"8a. {gone.name} gone (kubelet stopped, Node deleted)", go)

    def reported_lost() -> dict[str, Any] | None:
        r = kubectl_elv(cluster, "volumes", "-o", "json")
        assert r.returncode == 0, r.stderr
        rows = {x["pv"]: x for x in json.loads(r.stdout)}
        row = rows.get(lost_pv)
        return row if row and row["problem"].startswith("lost: node gone") else None

    row = steps.run("8b. kubectl elv reports its volume as lost", lambda: wait_for("a lost row", reported_lost, 60, 1))
    assert row["node"] == gone.name and row["pvc"] == f"{NS}/data-{gone.name}"
    dry = kubectl_elv(cluster, "forget-node", gone.name)
    assert dry.returncode == 0 and f"would forget: PV {lost_pv}" in dry.stdout, dry.stdout + dry.stderr
    assert api.maybe(f"/api/v1/persistentvolumes/{lost_pv}") is not None, "the dry run changed something"

    def forget() -> None:
        r = kubectl_elv(cluster, "forget-node", gone.name, "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_gone(api, f"{V1}/persistentvolumeclaims/data-{gone.name}", 120)
        wait_gone(api, f"/api/v1/persistentvolumes/{lost_pv}", 60)

    steps.run(f"8c. kubectl elv forget-node {gone.name} frees its PVC and PV", forget)
    for n in others:
        assert api.get(f"/api/v1/persistentvolumes/{kept[n.name]}")["status"]["phase"] == "Bound"
        assert exec_(cluster, f"w-{n.name}", "cat /data/hello").strip() == world["payload"][n.name]
    world["gone"] = gone.name


# ---------------------------------------------------------------- 9


def test_9_everything_deleted_nothing_left(cluster: Cluster, world: dict[str, Any]) -> None:
    api = world["api"]
    alive = [n for n in cluster.nodes if n.name != world.get("gone")]

    def delete_all() -> None:
        for g in api.get(GROUPSNAP)["items"]:
            api.delete(f"{GROUPSNAP}/{g['metadata']['name']}")
        for vs in api.get(SNAP)["items"]:
            api.delete(f"{SNAP}/{vs['metadata']['name']}")
        names = [p["metadata"]["name"] for p in api.get(f"{V1}/pods")["items"]]
        delete_pods(api, *names)
        claims = [c["metadata"]["name"] for c in api.get(f"{V1}/persistentvolumeclaims")["items"]]
        delete_claims(api, *claims)

        def clean() -> bool:
            left = {n.name: node_state(n) for n in alive}
            assert not any(any(x.values()) for x in left.values()), left
            return True

        wait_for("nothing on any node", clean, 120, 0.25)

    world["steps"].run("9. everything deleted: no file, loop device or mount left on any node", delete_all)
    for n in alive:
        assert not any(node_state(n).values()), (n.name, node_state(n))
    assert not [pv for pv in api.get("/api/v1/persistentvolumes")["items"] if pv["spec"]["csi"]["driver"] == DRIVER]

    def capacity_back() -> bool:
        caps = capacities(api)
        return all(caps.get((n.name, SC), 0) >= world["capacity0"][n.name] - 16 * MiB for n in alive)

    wait_for("capacity back on every node", capacity_back, 120, 1)


# ---------------------------------------------------------------- the deployment itself


def test_manifests_server_side(cluster: Cluster) -> None:
    """Every kustomization in deploy/ passes server-side dry-run, strict field validation."""
    for path in ("deploy/snapshot-controller", "deploy/overlays/loop", "deploy/overlays/lvm"):
        p = cluster.kubectl(
            "apply", "--dry-run=server", "--server-side", "--force-conflicts", "--validate=strict", "-f", "-",
            input=dump_all(kustomize(path)), check=False,
        )  # fmt: skip
        assert p.returncode == 0, f"{path}: {p.stderr}"
        assert "Warning" not in p.stderr, f"{path}: {p.stderr}"


def test_components_authorised_and_clean(cluster: Cluster) -> None:
    """RBAC from deploy/ sufficed (no 'forbidden' in any sidecar's or controller's
    log), and no driver logged a traceback."""
    for ns, label, containers in (
        (NAMESPACE, "app.kubernetes.io/name=elv-node", ("elv", "csi-provisioner", "csi-resizer", "csi-snapshotter")),
        ("kube-system", "app.kubernetes.io/name=snapshot-controller", ("snapshot-controller",)),
    ):
        for c in containers:
            log = cluster.kubectl("logs", "-n", ns, "-l", label, "-c", c, "--tail=-1", "--prefix", check=False).stdout
            bad = [line for line in log.splitlines() if "forbidden" in line or "Traceback" in line]
            assert not bad, f"{c}:\n" + "\n".join(bad[:5])
    cluster.check_alive()


@pytest.fixture(autouse=True)
def _alive(cluster: Cluster) -> None:
    cluster.check_alive()


__all__ = ["ClusterError", "wait_running"]
