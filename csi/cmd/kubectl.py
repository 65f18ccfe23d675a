"""``kubectl elv``: ELV volumes across the cluster, and the orphans.

Volumes are node-local, so no single API knows them all. This plugin joins
three views:

* the PersistentVolumes whose CSI driver is ELV (the cluster's view);
* each node's own inventory, from its driver (``elv volume list --json``),
  reached by exec into the node's ELV pod, or, for drivers that run as host
  processes, through a local socket given with ``--endpoint NODE=unix:///...``;
* each node's usage figures, from the kubelet's stats summary (which the
  kubelet fills from NodeGetVolumeStats) through the API server's node proxy.

Orphans are volumes no PV points to (leaked: safe to delete once confirmed)
and PVs whose volume is gone from its node (lost: their pods will not start).
Uses the kubernetes client (the ``[k8s]`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from csi import DRIVER_NAME
from csi.cmd.common import human, table

TOPOLOGY_SUFFIX = "/node"


@dataclass
class Row:
    node: str
    volume_id: str
    name: str
    size: int
    pv: str = ""
    pvc: str = ""
    used: int | None = None
    condition: str = ""
    problem: str = ""


def pv_node(pv: Mapping[str, Any], driver: str) -> str:
    """The node a PV's node affinity pins it to (our topology key), if any."""
    key = f"topology.{driver}{TOPOLOGY_SUFFIX}"
    terms = (((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}).get("nodeSelectorTerms") or []
    for term in terms:
        for expr in term.get("matchExpressions") or []:
            if expr.get("key") == key and expr.get("operator") == "In" and expr.get("values"):
                return str(expr["values"][0])
    return ""


def join(
    pvs: Iterable[Mapping[str, Any]],
    inventories: Mapping[str, list[Mapping[str, Any]]],
    usage: Mapping[str, Mapping[str, int]],
    driver: str = DRIVER_NAME,
    nodes: Iterable[str] | None = None,
) -> list[Row]:
    """Join PVs, per-node inventories and per-PVC usage into rows (pure).

    ``nodes`` are the cluster's Node objects (None: every node a PV names is
    taken to exist); a PV pinned to a node that is not among them is lost."""
    by_handle: dict[str, Mapping[str, Any]] = {}
    for pv in pvs:
        csi = (pv.get("spec") or {}).get("csi") or {}
        if csi.get("driver") == driver and csi.get("volumeHandle"):
            by_handle[str(csi["volumeHandle"])] = pv
    rows = [
        _inventory_row(node, v, by_handle, usage, driver) for node, vols in sorted(inventories.items()) for v in vols
    ]
    seen = {r.volume_id for r in rows}
    known = None if nodes is None else set(nodes)
    rows += [_lost_row(vid, pv, inventories, driver, known) for vid, pv in sorted(by_handle.items()) if vid not in seen]
    return rows


def _claim(pv: Mapping[str, Any]) -> str:
    claim = (pv.get("spec") or {}).get("claimRef") or {}
    return f"{claim.get('namespace')}/{claim.get('name')}" if claim else ""


def _inventory_row(
    node: str,
    v: Mapping[str, Any],
    by_handle: Mapping[str, Mapping[str, Any]],
    usage: Mapping[str, Mapping[str, int]],
    driver: str,
) -> Row:
    """A volume a node's driver reports, with the PV that points to it (if any)."""
    vid = str(v.get("id", ""))
    row = Row(node, vid, str(v.get("name", "")), int(v.get("size", 0)), condition=str(v.get("condition", "")))
    if v.get("used") is not None:
        row.used = int(v["used"])
    found = by_handle.get(vid)
    if found is None:
        row.problem = "orphan: no PersistentVolume"
        return row
    row.pv = str(found["metadata"]["name"])
    row.pvc = _claim(found)
    if row.pvc:
        row.used = usage.get(node, {}).get(row.pvc, row.used)
    want = pv_node(found, driver)
    if want and want != node:
        row.problem = f"PV says node {want}"
    return row


LOST_NODE = "lost: node gone"


def _lost_row(
    vid: str, pv: Mapping[str, Any], inventories: Mapping[str, Any], driver: str, nodes: set[str] | None
) -> Row:
    """A PV whose volume no inspected node reports."""
    node = pv_node(pv, driver)
    size = _quantity(((pv.get("spec") or {}).get("capacity") or {}).get("storage", "0"))
    if node and nodes is not None and node not in nodes:
        problem = f"{LOST_NODE} (kubectl elv forget-node {node})"
    elif node in inventories:
        problem = "lost: volume missing on its node"
    else:
        problem = "node not inspected"
    return Row(node or "?", vid, "", size, str(pv["metadata"]["name"]), _claim(pv), problem=problem)


def usage_from_summary(summary: Mapping[str, Any]) -> dict[str, int]:
    """PVC ("ns/name") -> used bytes, from a kubelet /stats/summary document."""
    out: dict[str, int] = {}
    for pod in summary.get("pods") or []:
        for vol in pod.get("volume") or []:
            ref = vol.get("pvcRef")
            if ref and "usedBytes" in vol:
                out[f"{ref.get('namespace')}/{ref.get('name')}"] = int(vol["usedBytes"])
    return out


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _quantity(q: str) -> int:
    for suffix, mult in _UNITS.items():
        if q.endswith(suffix):
            return int(float(q[: -len(suffix)]) * mult)
    try:
        return int(q)
    except ValueError:
        return 0


# -- talking to the cluster ------------------------------------------------------


def _client(kubeconfig: str | None) -> Any:
    try:
        from kubernetes import client, config
    except ImportError:
        raise SystemExit("kubectl-elv needs the kubernetes client: pip install 'elv[k8s]'") from None
    config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    return client


def _inventory_via_exec(client: Any, node: str, namespace: str, selector: str, container: str) -> list[Any] | None:
    from kubernetes.stream import stream

    core = client.CoreV1Api()
    pods = core.list_namespaced_pod(
        namespace, label_selector=selector, field_selector=f"spec.nodeName={node},status.phase=Running"
    ).items
    # During a rollout the old pod may still be terminating beside the new one.
    pods = [p for p in pods if p.metadata.deletion_timestamp is None]
    if not pods:
        return None
    out = stream(
        core.connect_get_namespaced_pod_exec,
        pods[0].metadata.name,
        namespace,
        container=container,
        command=["elv", "volume", "list", "--json", "--endpoint", "unix:///csi/csi.sock"],
        stderr=False,
        stdin=False,
        stdout=True,
        tty=False,
    )
    return list(json.loads(out))


def staging_path(kubelet_dir: str, driver: str, volume_id: str) -> str:
    """Where kubelet stages a CSI volume (its layout since Kubernetes 1.24)."""
    digest = hashlib.sha256(volume_id.encode()).hexdigest()
    return os.path.join(kubelet_dir, "plugins", "kubernetes.io", "csi", driver, digest, "globalmount")


async def _inventory_via_socket(endpoint: str, driver: str) -> list[Any]:
    """The node's volumes, with their use from NodeGetVolumeStats on kubelet's
    staging path (the kubelet's own stats are not always reachable, e.g.
    through the API server's node proxy for a loopback node address)."""
    import grpc

    from csi.cmd.client import Client
    from csi.cmd.common import all_volumes, plugin
    from csi.cmd.volumes import _row
    from csi.v1 import csi_pb2

    async with Client(endpoint) as c:
        kubelet = (await plugin(c)).manifest.get("kubelet-dir", "/var/lib/kubelet")
        rows = [_row(e) for e in await all_volumes(c)]
        for r in rows:
            req = csi_pb2.NodeGetVolumeStatsRequest(
                volume_id=str(r["id"]), volume_path=staging_path(kubelet, driver, str(r["id"]))
            )
            try:
                stats = await c.node.NodeGetVolumeStats(req, timeout=10)
            except grpc.aio.AioRpcError:
                continue  # not staged by kubelet
            used = [u.used for u in stats.usage if u.unit == csi_pb2.VolumeUsage.BYTES]
            if used:
                r["used"] = used[0]
        return rows


def collect(args: argparse.Namespace) -> list[Row]:
    client = _client(args.kubeconfig)
    core = client.CoreV1Api()
    api = client.ApiClient()
    pvs = [api.sanitize_for_serialization(pv) for pv in core.list_persistent_volume().items]
    endpoints = dict(e.split("=", 1) for e in args.endpoint)
    nodes = [n.metadata.name for n in core.list_node().items]
    inventories: dict[str, list[Any]] = {}
    usage: dict[str, dict[str, int]] = {}
    for node in nodes:
        inv: list[Any] | None
        if node in endpoints:
            inv = asyncio.run(_inventory_via_socket(endpoints[node], args.driver))
        else:
            inv = _inventory_via_exec(client, node, args.namespace, args.selector, args.container)
        if inv is not None:
            inventories[node] = inv
        try:
            raw = core.connect_get_node_proxy_with_path(node, "stats/summary", _preload_content=False).data
            usage[node] = usage_from_summary(json.loads(raw))
        except Exception as e:  # a kubelet the API server cannot reach: use what the driver said
            print(f"kubectl-elv: no kubelet stats from node {node}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
    return join(pvs, inventories, usage, args.driver, nodes)


# -- a node that is gone ------------------------------------------------------------

PROVISIONER_FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"


@dataclass
class Forget:
    """One PV of a gone node, and the claim bound to it ("" if none)."""

    pv: str
    claim_namespace: str = ""
    claim: str = ""


def forget_plan(pvs: Iterable[Mapping[str, Any]], node: str, driver: str = DRIVER_NAME) -> list[Forget]:
    """The PVs of ``driver`` pinned to ``node``, with their claims (pure)."""
    out = []
    for pv in pvs:
        if ((pv.get("spec") or {}).get("csi") or {}).get("driver") != driver or pv_node(pv, driver) != node:
            continue
        ref = (pv.get("spec") or {}).get("claimRef") or {}
        out.append(Forget(str(pv["metadata"]["name"]), str(ref.get("namespace") or ""), str(ref.get("name") or "")))
    return sorted(out, key=lambda f: f.pv)


def without_finalizer(finalizers: Iterable[str] | None, name: str) -> list[str]:
    return [f for f in finalizers or [] if f != name]


def forget_node(args: argparse.Namespace) -> int:
    """Free the PVCs and PVs of a node that is gone for good.

    Their volumes went with the node: no driver will ever delete them, so a
    PV keeps csi-provisioner's finalizer forever and its claim stays bound to
    it, and pods that need the claim stay Pending. This deletes each claim
    (force-deleting the gone node's pods that use it), removes the
    provisioner's finalizer and deletes the PV. Only PVs pinned to that node
    are touched; the Node object must be gone already (delete it first, once
    you are sure the node will not come back). Without --yes, only prints
    what it would do."""
    client = _client(args.kubeconfig)
    core = client.CoreV1Api()
    api = client.ApiClient()
    node = args.node
    if any(n.metadata.name == node for n in core.list_node().items):
        print(f"kubectl-elv: node {node} still exists; delete the Node object first", file=sys.stderr)
        return 2
    pvs = [api.sanitize_for_serialization(pv) for pv in core.list_persistent_volume().items]
    plan = forget_plan(pvs, node, args.driver)
    for f in plan:
        claim = f" and claim {f.claim_namespace}/{f.claim}" if f.claim else ""
        print(f"{'forget' if args.yes else 'would forget'}: PV {f.pv}{claim}")
    if not args.yes:
        if plan:
            print("dry run: add --yes to delete these claims and PVs")
        return 0
    for f in plan:
        _forget_one(core, client, node, f)
    return 0


def _forget_one(core: Any, client: Any, node: str, f: Forget) -> None:
    not_found = client.exceptions.ApiException
    if f.claim:
        for pod in core.list_namespaced_pod(f.claim_namespace, field_selector=f"spec.nodeName={node}").items:
            claims = {v.persistent_volume_claim.claim_name for v in pod.spec.volumes or [] if v.persistent_volume_claim}
            if f.claim in claims:
                core.delete_namespaced_pod(pod.metadata.name, f.claim_namespace, grace_period_seconds=0)
        try:
            pvc = core.read_namespaced_persistent_volume_claim(f.claim, f.claim_namespace)
            if pvc.spec.volume_name == f.pv:  # a claim of that name now bound elsewhere stays
                core.delete_namespaced_persistent_volume_claim(f.claim, f.claim_namespace)
        except not_found as e:
            if e.status != 404:
                raise
    _drop_pv(core, not_found, f.pv)


def _drop_pv(core: Any, api_error: type[Exception], name: str, timeout: float = 60.0) -> None:
    """Delete a PV and take csi-provisioner's finalizer off it until it is gone:
    a controller working from an older copy may put the finalizer back once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pv = core.read_persistent_volume(name)
            keep = without_finalizer(pv.metadata.finalizers, PROVISIONER_FINALIZER)
            if keep != list(pv.metadata.finalizers or []):
                body = {"metadata": {"finalizers": keep, "resourceVersion": pv.metadata.resource_version}}
                core.patch_persistent_volume(name, body, _content_type="application/merge-patch+json")
            if pv.metadata.deletion_timestamp is None:
                core.delete_persistent_volume(name)
        except api_error as e:
            status = getattr(e, "status", None)
            if status == 404:
                return
            if status != 409:  # 409: changed meanwhile; read it again
                raise
        time.sleep(0.5)
    raise SystemExit(f"kubectl-elv: PV {name} is still there after {timeout:g} s")


def parser() -> argparse.ArgumentParser:
    """The command line. The defaults name the DaemonSet deploy/ ships
    (namespace elv-system, pods labelled app.kubernetes.io/name=elv-node,
    the driver's container elv), so no flag is needed on such a cluster."""
    p = argparse.ArgumentParser(prog="kubectl elv", description="ELV volumes across the cluster")
    p.add_argument("what", nargs="?", choices=["volumes", "orphans", "forget-node"], default="volumes")
    p.add_argument("node", nargs="?", help="forget-node: the gone node whose PVs and claims to free")
    p.add_argument("--yes", action="store_true", help="forget-node: do it (without it, only print the plan)")
    p.add_argument("--kubeconfig", default=None)
    p.add_argument("--driver", default=DRIVER_NAME)
    p.add_argument("--namespace", default="elv-system", help="namespace of the ELV DaemonSet")
    p.add_argument("--selector", default="app.kubernetes.io/name=elv-node", help="label selector of its pods")
    p.add_argument("--container", default="elv")
    p.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="NODE=unix:///path",
        help="a node whose driver runs as a host process: ask its socket directly",
    )
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.what == "forget-node":
        if not args.node:
            p.error("forget-node needs the node's name")
        return forget_node(args)
    rows = collect(args)
    if args.what == "orphans":
        rows = [r for r in rows if r.problem]
    status = 1 if args.what == "orphans" and rows else 0  # scripts can act on "orphans found"
    if args.output == "json":
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return status
    print(
        table(
            [
                [
                    r.node,
                    r.pvc or "-",
                    r.pv or "-",
                    r.name or "-",
                    human(r.size),
                    human(r.used) if r.used is not None else "-",
                    r.condition or "-",
                    r.problem or "",
                    r.volume_id,
                ]
                for r in rows
            ],
            ["NODE", "PVC", "PV", "NAME", "SIZE", "USED", "CONDITION", "PROBLEM", "VOLUME"],
        )
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
