"""ELV in a real Kubernetes cluster, on the loop StorageClass (elv-loop, xfs).

From PVC to running pod and back to nothing: (1) a pod with a PVC is
scheduled by storage capacity, its PVC binds and it writes data; (2) the pod
is deleted and created again and the data is still there; (3) the PVC is
expanded online and `df` in the pod shows the new size; (4) a VolumeSnapshot
is restored to a new PVC holding the same data; (5) everything is deleted and
the node holds no backing file, loop device or mount; (6) CSIStorageCapacity
objects exist and change as volumes come and go. Each step is timed, and the
PVC-to-Bound and pod-to-Running latencies are measured (ci-out/k8s-summary.json).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.support.cluster import (
    DRIVER,
    NAMESPACE,
    Api,
    Cluster,
    ClusterError,
    kustomize,
    loops_under,
    mounts_under,
    wait_for,
)
from tests.support.k8s import SC, Summary, phase, pod, pvc

MiB = 1024 * 1024
NS = "elv-test"
V1 = f"/api/v1/namespaces/{NS}"
SNAP = f"/apis/snapshot.storage.k8s.io/v1/namespaces/{NS}/volumesnapshots"
CAPS = f"/apis/storage.k8s.io/v1/namespaces/{NAMESPACE}/csistoragecapacities"


class Steps:
    def __init__(self, summary: Summary) -> None:
        self.summary = summary
        self.times: dict[str, float] = summary.data.setdefault("steps_s", {})

    def run(self, name: str, fn: Callable[[], None]) -> None:
        t = time.monotonic()
        fn()
        self.times[name] = round(time.monotonic() - t, 2)
        print(f"  {name}: {self.times[name]:.2f} s", flush=True)


def create_and_time(api: Api, claim: dict[str, Any] | None, p: dict[str, Any]) -> dict[str, float]:
    """Create a PVC (optional) and its pod together; time Bound and Running."""
    t0 = time.monotonic()
    if claim:
        api.create(f"{V1}/persistentvolumeclaims", claim)
    api.create(f"{V1}/pods", p)
    out: dict[str, float] = {}
    pvc_path = f"{V1}/persistentvolumeclaims/{p['spec']['volumes'][0]['persistentVolumeClaim']['claimName']}"
    pod_path = f"{V1}/pods/{p['metadata']['name']}"
    deadline = t0 + 120
    while time.monotonic() < deadline:
        now = time.monotonic()
        if "pvc_to_bound_s" not in out and phase(api, pvc_path) == "Bound":
            out["pvc_to_bound_s"] = round(now - t0, 3)
        ph = phase(api, pod_path)
        if ph == "Running":
            out["pod_to_running_s"] = round(now - t0, 3)
            out.setdefault("pvc_to_bound_s", out["pod_to_running_s"])
            return out
        if ph in ("Failed", "Succeeded"):
            break
        time.sleep(0.05)
    events = api.get(f"{V1}/events")["items"]
    msgs = "\n".join(f"{e['involvedObject']['name']}: {e['reason']}: {e.get('message', '')}" for e in events)
    raise AssertionError(f"pod {p['metadata']['name']} not Running (phase {ph!r}); events:\n{msgs}")


def exec_(cluster: Cluster, pod_name: str, script: str) -> str:
    return cluster.kubectl("exec", "-n", NS, pod_name, "--", "sh", "-c", script, timeout=60).stdout


def df_kib(cluster: Cluster, pod_name: str) -> int:
    line = exec_(cluster, pod_name, "df -k /data").strip().splitlines()[-1]
    return int(line.split()[1])


def capacity(api: Api) -> int | None:
    """The elv-loop CSIStorageCapacity of our node, in bytes (None: no object)."""
    for c in api.get(CAPS)["items"]:
        if c.get("storageClassName") == SC:
            return parse_quantity(c.get("capacity", "0"))
    return None


def parse_quantity(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", q)
    assert m, q
    mult = {
        None: 1,
        "Ki": 1024,
        "Mi": MiB,
        "Gi": 1024 * MiB,
        "Ti": MiB * MiB,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }
    return int(m.group(1)) * mult[m.group(2)]


def wait_gone(api: Api, path: str, timeout: float = 60) -> None:
    wait_for(f"{path} deleted", lambda: api.maybe(path) is None, timeout, 0.1)


def node_state(cluster: Cluster) -> dict[str, list[str]]:
    pool = cluster.pool
    files = []
    for sub in ("volumes", "snapshots"):
        d = os.path.join(pool, sub)
        if os.path.isdir(d):
            files += [f"{sub}/{f}" for f in sorted(os.listdir(d))]
    mounts = [m for m in mounts_under(cluster.kubelet_dir) if m != os.path.realpath(cluster.kubelet_dir)]
    return {"files": files, "loops": loops_under(cluster.root), "mounts": mounts}


def test_manifests_server_side(cluster: Cluster) -> None:
    """Every kustomization in deploy/ passes server-side dry-run, strict field validation."""
    for path in ("deploy/snapshot-controller", "deploy/overlays/loop", "deploy/overlays/lvm"):
        doc = "\n---\n".join(yaml.safe_dump(o) for o in kustomize(path))
        p = cluster.kubectl(
            "apply",
            "--dry-run=server",
            "--server-side",
            "--force-conflicts",
            "--validate=strict",
            "-f",
            "-",
            input=doc,
            check=False,
        )
        assert p.returncode == 0, f"{path}: {p.stderr}"
        assert "Warning" not in p.stderr, f"{path}: {p.stderr}"


class EndToEnd:
    """The steps of the loop StorageClass's story, one method each; what a step
    learns (latencies, the volume, capacity figures) is kept for the later ones."""

    def __init__(self, cluster: Cluster, api: Api, payload: str) -> None:
        self.cluster = cluster
        self.api = api
        self.payload = payload
        self.state: dict[str, Any] = {}
        self.caps: dict[str, int | None] = {}

    def capacity_objects(self) -> None:
        # (6) capacity is published for the loop class of our node.
        self.caps["before"] = wait_for("a CSIStorageCapacity for elv-loop", lambda: capacity(self.api), 60, 0.25)
        objs = [c for c in self.api.get(CAPS)["items"] if c.get("storageClassName") == SC]
        assert len(objs) == 1, objs
        terms = objs[0]["nodeTopology"]["matchLabels"]
        assert terms == {f"topology.{DRIVER}/node": self.cluster.node}, terms

    def create_write(self) -> None:
        # (1) scheduled by capacity, bound, running, writes data.
        lat = create_and_time(self.api, pvc("data", "300Mi"), pod("writer", "data"))
        self.state["first"] = lat
        p = self.api.get(f"{V1}/pods/writer")
        assert p["spec"]["nodeName"] == self.cluster.node
        claim = self.api.get(f"{V1}/persistentvolumeclaims/data")
        assert claim["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == self.cluster.node
        pv = self.api.get(f"/api/v1/persistentvolumes/{claim['spec']['volumeName']}")
        assert pv["spec"]["csi"]["driver"] == DRIVER
        assert pv["spec"]["csi"]["fsType"] == "xfs"
        req = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
        assert req["key"] == f"topology.{DRIVER}/node" and req["values"] == [self.cluster.node], req
        self.state["pv"] = pv["metadata"]["name"]
        self.state["volume"] = pv["spec"]["csi"]["volumeHandle"]
        exec_(
            self.cluster,
            "writer",
            f"echo {self.payload} > /data/hello && mkdir -p /data/d && "
            f"dd if=/dev/urandom of=/data/d/blob bs=64k count=16 2>/dev/null && sync",
        )
        self.state["sum"] = exec_(self.cluster, "writer", "sha256sum /data/d/blob").split()[0]
        # fsGroup applied (fsGroupPolicy File): the files carry group 2000.
        assert exec_(self.cluster, "writer", "stat -c %g /data/hello").strip() == "2000"

    def capacity_drops(self) -> None:
        # (6) ... and it changes when a volume is created.
        before = self.caps["before"]
        assert before is not None
        self.caps["after_create"] = wait_for(
            "capacity to drop by the new volume",
            lambda: (c := capacity(self.api)) is not None and c < before and c,
            60,
            0.25,
        )
        drop = before - self.caps["after_create"]
        assert 250 * MiB <= drop <= 400 * MiB, f"capacity dropped by {drop / MiB:.0f} MiB for a 300 MiB volume"

    def recreate(self) -> None:
        # (2) delete the pod, make it again: the data is still there.
        self.api.request("DELETE", f"{V1}/pods/writer", {"gracePeriodSeconds": 0})
        wait_gone(self.api, f"{V1}/pods/writer")
        # kubelet unpublished and unstaged it: no mount of the volume is left.
        wait_for("volume unmounted after the pod went", lambda: not node_state(self.cluster)["mounts"], 60, 0.1)
        self.state["second"] = create_and_time(self.api, None, pod("writer", "data"))
        assert exec_(self.cluster, "writer", "cat /data/hello").strip() == self.payload
        assert exec_(self.cluster, "writer", "sha256sum /data/d/blob").split()[0] == self.state["sum"]

    def expand(self) -> None:
        # (3) grow online; df in the running pod sees it.
        before = df_kib(self.cluster, "writer")
        self.api.patch(f"{V1}/persistentvolumeclaims/data", {"spec": {"resources": {"requests": {"storage": "600Mi"}}}})

        def grown() -> bool:
            c = self.api.get(f"{V1}/persistentvolumeclaims/data")["status"].get("capacity", {}).get("storage")
            return c == "600Mi" and df_kib(self.cluster, "writer") > before + 270 * 1024

        wait_for("PVC capacity 600Mi and a bigger filesystem in the pod", grown, 120, 0.5)
        self.state["df_kib"] = [before, df_kib(self.cluster, "writer")]
        assert exec_(self.cluster, "writer", "cat /data/hello").strip() == self.payload

    def snapshot_restore(self) -> None:
        # (4) snapshot, restore into a new PVC, same data.
        self.api.create(
            SNAP,
            {
                "apiVersion": "snapshot.storage.k8s.io/v1",
                "kind": "VolumeSnapshot",
                "metadata": {"name": "snap"},
                "spec": {"volumeSnapshotClassName": "elv-snapshots", "source": {"persistentVolumeClaimName": "data"}},
            },
        )
        t = time.monotonic()
        wait_for(
            "snapshot readyToUse",
            lambda: (self.api.maybe(f"{SNAP}/snap") or {}).get("status", {}).get("readyToUse"),
            120,
            0.1,
        )
        self.state["snapshot_ready_s"] = round(time.monotonic() - t, 3)
        self.state["restore"] = create_and_time(
            self.api, pvc("restored", "600Mi", source="snap"), pod("reader", "restored")
        )
        assert exec_(self.cluster, "reader", "cat /data/hello").strip() == self.payload
        assert exec_(self.cluster, "reader", "sha256sum /data/d/blob").split()[0] == self.state["sum"]
        # The restore is a volume of its own: writing there leaves the source alone.
        exec_(self.cluster, "reader", "echo changed > /data/hello")
        assert exec_(self.cluster, "writer", "cat /data/hello").strip() == self.payload

    def delete_all(self) -> None:
        # (5) delete everything; nothing is left on the node.
        pvs = [self.api.get(f"{V1}/persistentvolumeclaims/{n}")["spec"]["volumeName"] for n in ("data", "restored")]
        for p in ("writer", "reader"):
            self.api.request("DELETE", f"{V1}/pods/{p}", {"gracePeriodSeconds": 0})
        self.api.delete(f"{SNAP}/snap")
        for p in ("writer", "reader"):
            wait_gone(self.api, f"{V1}/pods/{p}")
        for n in ("data", "restored"):
            self.api.delete(f"{V1}/persistentvolumeclaims/{n}")
        for n in ("data", "restored"):
            wait_gone(self.api, f"{V1}/persistentvolumeclaims/{n}")
        for pv in pvs:
            wait_gone(self.api, f"/api/v1/persistentvolumes/{pv}")
        wait_gone(self.api, f"{SNAP}/snap")

        def contents_gone() -> bool:
            items = self.api.get("/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents")["items"]
            return not items

        wait_for("VolumeSnapshotContents deleted", contents_gone, 60, 0.1)
        wait_for("nothing on the node", lambda: not any(node_state(self.cluster).values()), 30, 0.1)
        left = node_state(self.cluster)
        assert not any(left.values()), left

    def capacity_back(self) -> None:
        # (6) ... and comes back when the volumes are gone.
        after = self.caps["after_create"]
        assert after is not None
        self.caps["after_delete"] = wait_for(
            "capacity to come back", lambda: (c := capacity(self.api)) is not None and c > after and c, 60, 0.25
        )


def test_loop_storage_class_end_to_end(cluster: Cluster, summary: Summary) -> None:
    api = cluster.api()
    steps = Steps(summary)
    e = EndToEnd(cluster, api, secrets.token_hex(16))
    state, caps = e.state, e.caps
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    wait_for("default ServiceAccount in the test namespace", lambda: api.maybe(f"{V1}/serviceaccounts/default"), 60)
    try:
        steps.run("6a. CSIStorageCapacity published", e.capacity_objects)
        steps.run("1. PVC + pod: scheduled, bound, running, data written", e.create_write)
        steps.run("6b. capacity drops after CreateVolume", e.capacity_drops)
        steps.run("2. pod deleted and recreated: data still there", e.recreate)
        steps.run("3. online expansion 300Mi -> 600Mi, seen by df", e.expand)
        steps.run("4. snapshot restored into a new PVC: same data", e.snapshot_restore)
        steps.run("5. everything deleted: no file, loop device or mount left", e.delete_all)
        steps.run("6c. capacity back after DeleteVolume", e.capacity_back)
    except (AssertionError, ClusterError):
        for name in ("elv", "csi-provisioner", "csi-resizer", "csi-snapshotter", "kubelet"):
            print(f"--- {name} log tail\n{cluster.tail(name, 3000)}")
        raise
    finally:
        summary.data["latency_s"] = {k: v for k, v in state.items() if k in ("first", "second", "restore")}
        summary.data["snapshot_ready_s"] = state.get("snapshot_ready_s")
        summary.data["df_kib_before_after_expand"] = state.get("df_kib")
        summary.data["capacity_bytes"] = caps
        with_ns = api.maybe(f"/api/v1/namespaces/{NS}")
        if with_ns:
            api.delete(f"/api/v1/namespaces/{NS}")

    first = state["first"]
    print(f"  PVC-to-Bound {first['pvc_to_bound_s']:.2f} s, pod-to-Running {first['pod_to_running_s']:.2f} s")


def test_components_authorised_and_clean(cluster: Cluster) -> None:
    """RBAC from deploy/ sufficed (no 'forbidden' in any sidecar log), and the driver never crashed."""
    for name in ("csi-provisioner", "csi-resizer", "csi-snapshotter", "snapshot-controller"):
        log = cluster.tail(name, 10**7)
        bad = [line for line in log.splitlines() if "forbidden" in line]
        assert not bad, f"{name} was refused by the API server (RBAC in deploy/ too tight):\n" + "\n".join(bad[:5])
    elv = cluster.tail("elv", 10**7)
    assert "Traceback" not in elv, elv[-5000:]
    cluster.check_alive()


@pytest.fixture(autouse=True)
def _alive(cluster: Cluster) -> None:
    cluster.check_alive()
