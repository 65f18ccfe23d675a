"""What the cluster tests share: the run's summary (ci-out/k8s-summary.json),
the Kubernetes objects they create (PVCs of the loop class, pods pinned to a
node or not), waiting for them, and looking at a node from the host."""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.support.cluster import BUSYBOX, DRIVER, REPO, Api, Cluster, Node, wait_for
from tests.support.kube import mountinfo

SUMMARY = os.path.join(REPO, "ci-out", "k8s-summary.json")
#: The loop StorageClass of deploy/overlays/loop (xfs).
SC = "elv-loop"
NS = "elv-test"
V1 = f"/api/v1/namespaces/{NS}"
SNAP = f"/apis/snapshot.storage.k8s.io/v1/namespaces/{NS}/volumesnapshots"
GROUPSNAP = f"/apis/groupsnapshot.storage.k8s.io/v1/namespaces/{NS}/volumegroupsnapshots"
CAPS = "/apis/storage.k8s.io/v1/namespaces/elv-system/csistoragecapacities"
TOPOLOGY = f"topology.{DRIVER}/node"
MiB = 1024 * 1024


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


class Steps:
    """Each step of a test, timed into the summary."""

    def __init__(self, summary: Summary) -> None:
        self.times: dict[str, float] = summary.data.setdefault("steps_s", {})

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.monotonic()
        out = fn()
        self.times[name] = round(time.monotonic() - t, 2)
        print(f"  {name}: {self.times[name]:.2f} s", flush=True)
        return out


# ---------------------------------------------------------------- objects


def pvc(name: str, size: str, source: str | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": SC,
        "resources": {"requests": {"storage": size}},
    }
    if source:
        spec["dataSource"] = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": source}
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def pod(name: str, claim: str, node: str | None = None, command: list[str] | None = None) -> dict[str, Any]:
    """A busybox pod with ``claim`` at /data, pinned to ``node`` through the
    scheduler (a nodeSelector: nodeName would skip the scheduler, and with it
    the volume's WaitForFirstConsumer binding). Not root: it can write only
    because kubelet applied fsGroup (CSIDriver fsGroupPolicy: File)."""
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 0,
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000},
        "containers": [
            {
                "name": "c",
                "image": BUSYBOX,
                "imagePullPolicy": "IfNotPresent",
                "command": command or ["sleep", "3600"],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }
        ],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
    }
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def phase(api: Api, path: str) -> str:
    o = api.maybe(path)
    return (o or {}).get("status", {}).get("phase", "")


def events(api: Api, name: str | None = None) -> list[str]:
    out = []
    for e in api.get(f"{V1}/events")["items"]:
        if name is None or e["involvedObject"]["name"] == name:
            out.append(f"{e['involvedObject']['name']}: {e['reason']}: {e.get('message', '')}")
    return out


def create_and_time(
    api: Api, claim: dict[str, Any] | None, p: dict[str, Any], timeout: float = 180
) -> dict[str, float]:
    """Create a PVC (optional) and its pod together; time Bound and Running."""
    t0 = time.monotonic()
    if claim:
        api.create(f"{V1}/persistentvolumeclaims", claim)
    api.create(f"{V1}/pods", p)
    return wait_running(api, p, t0, timeout)


def wait_running(api: Api, p: dict[str, Any], t0: float, timeout: float = 180) -> dict[str, float]:
    out: dict[str, float] = {}
    claim = p["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    pod_path = f"{V1}/pods/{p['metadata']['name']}"
    ph = ""
    while time.monotonic() < t0 + timeout:
        now = time.monotonic()
        if "pvc_to_bound_s" not in out and phase(api, f"{V1}/persistentvolumeclaims/{claim}") == "Bound":
            out["pvc_to_bound_s"] = round(now - t0, 3)
        ph = phase(api, pod_path)
        if ph == "Running":
            out["pod_to_running_s"] = round(now - t0, 3)
            out.setdefault("pvc_to_bound_s", out["pod_to_running_s"])
            return out
        if ph in ("Failed", "Succeeded"):
            break
        time.sleep(0.05)
    msgs = "\n".join(events(api))
    raise AssertionError(f"pod {p['metadata']['name']} not Running (phase {ph!r}); events:\n{msgs}")


def delete_pods(api: Api, *names: str) -> None:
    for n in names:
        api.request("DELETE", f"{V1}/pods/{n}", {"gracePeriodSeconds": 0})
    for n in names:
        wait_gone(api, f"{V1}/pods/{n}")


def delete_claims(api: Api, *names: str) -> None:
    """Delete PVCs and wait for their PVs (and so their volumes) to go."""
    pvs = []
    for n in names:
        c = api.maybe(f"{V1}/persistentvolumeclaims/{n}")
        if c and c["spec"].get("volumeName"):
            pvs.append(c["spec"]["volumeName"])
        api.delete(f"{V1}/persistentvolumeclaims/{n}")
    for n in names:
        wait_gone(api, f"{V1}/persistentvolumeclaims/{n}")
    for pv in pvs:
        wait_gone(api, f"/api/v1/persistentvolumes/{pv}", 120)


def wait_gone(api: Api, path: str, timeout: float = 90) -> None:
    wait_for(f"{path} deleted", lambda: api.maybe(path) is None, timeout, 0.1)


def pv_of(api: Api, claim: str) -> dict[str, Any]:
    c = api.get(f"{V1}/persistentvolumeclaims/{claim}")
    return dict(api.get(f"/api/v1/persistentvolumes/{c['spec']['volumeName']}"))


def pv_node(pv: dict[str, Any]) -> str:
    req = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
    assert req["key"] == TOPOLOGY and req["operator"] == "In" and len(req["values"]) == 1, req
    return str(req["values"][0])


def exec_(cluster: Cluster, pod_name: str, script: str, namespace: str = NS, container: str | None = None) -> str:
    argv = ["exec", "-n", namespace, pod_name]
    if container:
        argv += ["-c", container]
    return cluster.kubectl(*argv, "--", "sh", "-c", script, timeout=90).stdout


def df_kib(cluster: Cluster, pod_name: str) -> int:
    line = exec_(cluster, pod_name, "df -k /data").strip().splitlines()[-1]
    return int(line.split()[1])


def parse_quantity(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", q)
    assert m, q
    mult = {None: 1, "Ki": 1024, "Mi": MiB, "Gi": 1024 * MiB, "Ti": MiB * MiB, "k": 10**3, "M": 10**6}
    mult.update({"G": 10**9, "T": 10**12})
    return int(m.group(1)) * mult[m.group(2)]


def capacities(api: Api) -> dict[tuple[str, str], int]:
    """(node, StorageClass) -> the capacity its CSIStorageCapacity object publishes."""
    out = {}
    for c in api.get(CAPS)["items"]:
        node = (c.get("nodeTopology") or {}).get("matchLabels", {}).get(TOPOLOGY, "")
        out[(node, c["storageClassName"])] = parse_quantity(c.get("capacity", "0"))
    return out


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3),
        "mean": round(statistics.fmean(values), 3),
    }


# ---------------------------------------------------------------- a node, from the host


def pool_files(node: Node) -> dict[str, list[str]]:
    """The volume and snapshot files in the node's ELV pool (what the driver made there)."""
    out = {}
    for sub in ("volumes", "snapshots", "groups"):
        d = node.view(f"/var/lib/elv/loop/{sub}")
        out[sub] = sorted(f for f in os.listdir(d) if not f.startswith(".")) if os.path.isdir(d) else []
    return out


def volume_image(node: Node, volume_id: str) -> str:
    return node.view(f"/var/lib/elv/loop/volumes/{volume_id}.img")


def csi_mounts(node: Node) -> list[tuple[int, str]]:
    """(mount ID, mount point) of every CSI volume mount in the node's mount
    namespace: staging (plugins/kubernetes.io/csi) and publish (pods/.../volumes)."""
    out = []
    with open(f"/proc/{node.holder}/mountinfo") as f:
        for line in f:
            fields = line.split()
            mp = fields[4]
            if mp.startswith("/var/lib/kubelet/") and ("/kubernetes.io~csi/" in mp or "/kubernetes.io/csi/" in mp):
                out.append((int(fields[0]), mp))
    return sorted(out)


def published_dir(node: Node, pod_uid: str, pv: str) -> str:
    """A pod's CSI volume as its node sees it: kubelet's publish directory, the
    driver's plain bind mount (never idmapped), read through the node's holder.
    A file's owner there is its owner on disk."""
    return node.view(f"/var/lib/kubelet/pods/{pod_uid}/volumes/kubernetes.io~csi/{pv}/mount")


# ---------------------------------------------------------------- user namespaces, from the host


def parse_id_map(text: str) -> list[tuple[int, int, int]]:
    """/proc/PID/uid_map or gid_map: (first ID inside, first ID outside, count) per line."""
    out = []
    for line in text.splitlines():
        if line.strip():
            inside, outside, count = (int(x) for x in line.split())
            out.append((inside, outside, count))
    return out


@dataclass(frozen=True)
class HostProcess:
    pid: int
    uids: tuple[int, ...]  # real, effective, saved, filesystem: as the host sees them
    gids: tuple[int, ...]
    argv: tuple[str, ...]


def processes_in_userns(ns_inode: int) -> list[HostProcess]:
    """Every process in the user namespace whose nsfs inode is ``ns_inode``
    (``readlink /proc/self/ns/user`` inside it says ``user:[INODE]``), with its
    IDs as the host's /proc/PID/status gives them."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.stat(f"/proc/{d}/ns/user").st_ino != ns_inode:
                continue
            with open(f"/proc/{d}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
        except (OSError, ValueError):
            continue  # gone meanwhile
        uids = tuple(int(x) for x in status["Uid"].split())
        gids = tuple(int(x) for x in status["Gid"].split())
        out.append(HostProcess(int(d), uids, gids, argv))
    return sorted(out, key=lambda p: p.pid)


def node_state(node: Node) -> dict[str, list[str]]:
    """What the driver left on a node: pool files, volume loop devices, CSI mounts."""
    files = pool_files(node)
    loops = [d for d in node.volume_loops() if d != node.pool_loop]
    mounts = [mp for _, mp in csi_mounts(node)]
    return {"files": files["volumes"] + files["snapshots"] + files["groups"], "loops": loops, "mounts": mounts}


__all__ = ["mountinfo"]
