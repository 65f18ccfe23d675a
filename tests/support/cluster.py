"""A Kubernetes cluster of N nodes on this machine, for ELV's cluster test.

One control plane of host processes (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler) and N nodes, each with its own
mount and network namespace, containerd, kubelet, kubelet root directory,
ELV pool and cgroup root (tests/support/k8snode.py). Nothing is pulled: the
images are the ones scripts/build-image builds (the node plugin from the
repository's Dockerfile, the sidecars under the names deploy/ gives them)
plus busybox and pause images made here, imported into every node's
containerd. Then deploy/ is applied as it is: the CRDs of the snapshot API,
deploy/overlays/loop (the DaemonSet runs as real pods on every node,
privileged, with Bidirectional mount propagation) and
deploy/snapshot-controller.

Everything of one cluster is unique to it, so clusters (a CI run's and a
developer's) can run side by side: its scratch root (/tmp/elv-k8s-XXXXXXXX),
its test bridge (elvb<tag>) and /24, its veths (elv<tag><n>), its cgroup
roots (elv-<tag>-<node>), its ports. The API server listens on the bridge
only; the rest of the control plane on 127.0.0.1. Nothing reaches an address
outside loopback and the namespaces the cluster made.

Everything the cluster makes is recorded in state.json before it is made, so
down() (also from another process: scripts/k8s-cluster, tests/reap.py)
removes exactly that, and leftovers() says what is still there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from tests.support.k8snode import CNI_DIR, SERVICE_RANGE, Node
from tests.support.kube import (
    BIN,
    BUSYBOX,
    CONTAINERD2_BIN,
    CONTAINERD2_TOOLS,
    DRIVER,
    HOST_PATH,
    PAUSE,
    TOOLS,
    Api,
    ApiError,
    ClusterError,
    Pki,
    Proc,
    dump_all,
    free_port,
    image_set,
    kill_group,
    kustomize,
    link_exists,
    log,
    mounts_under,
    pid_alive,
    read_sysctl,
    run,
    sa_subject,
    static_busybox,
    tar_image,
    wait_for,
)
from tests.support.paths import REPO

__all__ = [
    "BIN",
    "BUSYBOX",
    "DRIVER",
    "PAUSE",
    "REPO",
    "Api",
    "ApiError",
    "Cluster",
    "ClusterError",
    "Node",
    "kustomize",
    "mounts_under",
    "wait_for",
]

CRDS = os.path.join(TOOLS, "crds")
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
NAMESPACE = "elv-system"
SA = "elv-node"
K8S_BINS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl")
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "openssl", "iptables", "ip", "nsenter", "unshare")
HOST_TOOLS += ("losetup", "mkfs.xfs", "buildah", "mmdebstrap")
#: Global sysctls kubelet sets (the per-namespace ones go with the node).
SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
#: The test bridges' addresses come from here, one /24 per cluster.
NET_PREFIX = "10.204"
NET_LOCK = "/tmp/elv-k8s-net.lock"
#: The node that runs containerd v2 (containerd2_node).
CONTAINERD2_NODE = 3
#: The taint pods_only_on() puts on the nodes pods must stay off (NoSchedule).
ELSEWHERE_TAINT = "e2e.elv.csi.dev/elsewhere"


def containerd2_node(nodes: int) -> int:
    """The index of the node that runs containerd v2 and runc 1.3+ (user-namespaced
    pods need them; Debian's 1.6 and 1.1 run the others): the third, or the
    last of a smaller cluster."""
    return min(CONTAINERD2_NODE, nodes)


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run the cluster; empty when all is there."""
    out = []
    if os.geteuid() != 0:
        out.append("root (namespaces, mounts, loop devices, containers)")
    out += [f"{BIN}/{b} (scripts/k8s-tools)" for b in K8S_BINS if not os.access(os.path.join(BIN, b), os.X_OK)]
    out += [
        f"{CONTAINERD2_BIN}/{b} (scripts/k8s-tools containerd2)"
        for b in CONTAINERD2_TOOLS
        if not os.access(os.path.join(CONTAINERD2_BIN, b), os.X_OK)
    ]
    out += [f"{t} (scripts/setup-k8s)" for t in HOST_TOOLS if shutil.which(t) is None]
    out += [
        f"{CNI_DIR}/{p} (containernetworking-plugins; scripts/setup-k8s)"
        for p in ("bridge", "host-local", "loopback")
        if not os.access(os.path.join(CNI_DIR, p), os.X_OK)
    ]
    if not static_busybox():
        out.append("a static /bin/busybox (busybox-static; scripts/setup-k8s)")
    if not os.path.isdir(CRDS):
        out.append(f"{CRDS} (scripts/k8s-tools crds)")
    return out


def built_images() -> list[str]:
    """Build (or find, when nothing changed) the node plugin and sidecar images
    with scripts/build-image; their docker-archive paths."""
    p = run([os.path.join(REPO, "scripts", "build-image"), "elv", "sidecars"], check=False, timeout=1800)
    if p.returncode != 0:
        raise ClusterError(f"scripts/build-image failed:\n{p.stderr[-3000:]}")
    paths = run([os.path.join(REPO, "scripts", "build-image"), "paths"]).stdout.split()
    if len(paths) != 2:
        raise ClusterError(f"scripts/build-image paths gave {paths}")
    return paths


@dataclass
class Cluster:
    root: str
    nodes_wanted: int = 3
    tag: str = ""
    gateway: str = ""
    nodes: list[Node] = field(default_factory=list)
    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    before: dict[str, Any] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=image_set)
    origin: str = "test"
    popens: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.tag:
            # mkdtemp's 8 characters: unique among live clusters, short
            # enough for interface names (15 bytes).
            self.tag = os.path.basename(self.root).removeprefix("elv-k8s-")[:8]

    # -- paths and clients

    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def bridge(self) -> str:
        return f"elvb{self.tag}"

    @property
    def kubeconfig(self) -> str:
        return self.p("kubeconfig", "admin.kubeconfig")

    @property
    def server(self) -> str:
        return f"https://{self.gateway}:{self.ports['apiserver']}"

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def api(self) -> Api:
        pki = Pki(self.p("pki"))
        return Api(self.server, pki.path("ca.crt"), pki.path("admin.crt"), pki.path("admin.key"))

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [os.path.join(BIN, "kubectl"), "--kubeconfig", self.kubeconfig, *args]
        return run(argv, check=check, timeout=timeout, input=input)

    @contextlib.contextmanager
    def pods_only_on(self, node: str, key: str = ELSEWHERE_TAINT) -> Iterator[None]:
        """While this lasts, a pod that does not tolerate KEY is scheduled only on
        NODE: every other node carries the taint KEY=NODE:NoSchedule. Pods
        already running stay where they are, and ELV's DaemonSet tolerates every
        taint, so each node keeps its plugin, provisioner and published
        capacity. The taints go again on the way out, whatever happened."""
        assert any(n.name == node for n in self.nodes), f"no node {node}"
        others = [n.name for n in self.nodes if n.name != node]
        try:
            for name in others:
                self.kubectl("taint", "node", name, f"{key}={node}:NoSchedule", "--overwrite")
            yield
        finally:
            for name in others:
                # Not there (the taint step failed before it): nothing to undo.
                self.kubectl("taint", "node", name, f"{key}:NoSchedule-", check=False)

    # -- state file (for down() from another process)

    def save(self) -> None:
        state = {
            "version": 2,
            "root": self.root,
            "tag": self.tag,
            "gateway": self.gateway,
            "origin": self.origin,
            "nodes": [n.to_state() for n in self.nodes],
            "ports": self.ports,
            "before": self.before,
            "procs": {k: vars(v) for k, v in self.procs.items()},
        }
        tmp = self.p("state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, self.p("state.json"))

    @classmethod
    def load(cls, root: str) -> Cluster:
        with open(os.path.join(root, "state.json")) as f:
            s = json.load(f)
        if s.get("version") != 2:
            raise ClusterError(f"{root}: a cluster of an older format (its own checkout must tear it down)")
        c = cls(root=s["root"], tag=s["tag"], gateway=s["gateway"], ports=s["ports"], before=s["before"])
        c.origin = s.get("origin", "test")
        c.nodes = [Node(**n) for n in s["nodes"]]
        c.procs = {k: Proc(**v) for k, v in s["procs"].items()}
        return c

    # -- processes

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        os.makedirs(self.p("logs"), exist_ok=True)
        path = self.p("logs", f"{name}.log")
        with open(path, "ab") as out:
            e = {
                "PATH": HOST_PATH,
                # tests/reap.py knows a cluster's processes by this.
                "HOME": self.root,
                "LC_ALL": "C.UTF-8",
                **(env or {}),
            }
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=e, cwd=self.root,
                start_new_session=True,
            )  # fmt: skip
        p = Proc(name, proc.pid, path)
        self.popens[proc.pid] = proc
        self.procs[name] = p
        self.save()
        return p

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        if p is None:
            return False
        popen = self.popens.get(p.pid)
        if popen is not None:
            return popen.poll() is None
        return pid_alive(p.pid)

    def check_alive(self) -> None:
        for name in self.procs:
            if not self.alive(name) and not name.startswith("stopped:"):
                raise ClusterError(f"{name} exited:\n{self.tail(name)}")

    def tail(self, name: str, n: int = 4000) -> str:
        p = self.procs.get(name)
        if p is None or not os.path.exists(p.log):
            return ""
        with open(p.log, errors="replace") as f:
            return f.read()[-n:]

    def stop(self, name: str, timeout: float = 15) -> None:
        p = self.procs.get(name)
        if p is None:
            return
        kill_group(p.pid, timeout)
        popen = self.popens.pop(p.pid, None)
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=5)

    # -- bring-up

    def up(self) -> Cluster:
        t0 = time.monotonic()
        missing = missing_prerequisites()
        if missing:
            raise ClusterError("missing prerequisites:\n  " + "\n  ".join(missing))
        os.makedirs(self.root, exist_ok=True)
        self.before = {"sysctls": {s: read_sysctl(s) for s in SYSCTLS}}
        self.save()

        def step(name: str, fn: Callable[[], None]) -> None:
            s = time.monotonic()
            fn()
            self.timings[name] = round(time.monotonic() - s, 2)
            log(f"{name}: {self.timings[name]:.2f} s")

        archives: list[str] = []
        step("images built (scripts/build-image)", lambda: archives.extend(built_images()))
        step("network", self._network)
        step("certificates", self._pki)
        step("etcd", self._etcd)
        step("nodes: namespaces, pools, containerd", self._nodes)
        step("kube-apiserver", self._apiserver)
        step("controllers", self._controllers)
        step("images imported on every node", lambda: self._import(archives))
        step("deploy objects", self._objects)
        step("kubelets", self._kubelets)
        step("ready: nodes, node plugin pods, CSINodes", self._ready)
        self.timings["up"] = round(time.monotonic() - t0, 2)
        log(f"cluster of {len(self.nodes)} nodes up in {self.timings['up']:.1f} s (root {self.root})")
        return self

    def _network(self) -> None:
        """The test bridge, on a /24 no other interface here uses."""
        with open(NET_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = run(["ip", "-4", "-o", "addr", "show"]).stdout
            free = [x for x in range(1, 255) if f" {NET_PREFIX}.{x}." not in used]
            if not free:
                raise ClusterError(f"no free /24 left in {NET_PREFIX}.0.0/16")
            x = random.choice(free)
            self.gateway = f"{NET_PREFIX}.{x}.1"
            self.before["bridge"] = self.bridge
            self.save()
            if link_exists(self.bridge):
                raise ClusterError(f"link {self.bridge} exists already")
            run(["ip", "link", "add", self.bridge, "type", "bridge"])
            run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
            run(["ip", "link", "set", self.bridge, "up"])
        self.nodes = [
            Node(
                self.root,
                i,
                f"elv-n{i}",
                f"{NET_PREFIX}.{x}.{10 + i}",
                self.gateway,
                self.tag,
                containerd2=i == containerd2_node(self.nodes_wanted),
            )
            for i in range(1, self.nodes_wanted + 1)
        ]
        self.save()

    def _pki(self) -> None:
        pki = Pki(self.p("pki"))
        pki.ca()
        pki.cert(
            "apiserver",
            "/CN=kube-apiserver",
            f"IP:{self.gateway},IP:127.0.0.1,IP:10.203.78.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc",
            server=True,
        )
        clients = {
            "admin": "/O=system:masters/CN=elv-test-admin",
            "apiserver-kubelet": "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "controller-manager": "/CN=system:kube-controller-manager",
            "scheduler": "/CN=system:kube-scheduler",
            "elv-node": sa_subject(NAMESPACE, SA),
        }
        self.ports["apiserver"] = free_port()
        os.makedirs(self.p("kubeconfig"), exist_ok=True)
        for name, subj in clients.items():
            self._kubeconfig(name, *pki.cert(name, subj))
        for n in self.nodes:
            pki.cert(f"kubelet-serving-{n.name}", f"/CN={n.name}", f"IP:{n.ip},DNS:{n.name}", server=True)
            self._kubeconfig(
                f"kubelet-{n.name}", *pki.cert(f"kubelet-{n.name}", f"/O=system:nodes/CN=system:node:{n.name}")
            )

    def _kubeconfig(self, name: str, crt: str, key: str) -> str:
        path = self.p("kubeconfig", f"{name}.kubeconfig")
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "elv", "cluster": {"server": self.server, "certificate-authority": self.p("pki", "ca.crt")}}
            ],
            "users": [{"name": name, "user": {"client-certificate": crt, "client-key": key}}],
            "contexts": [{"name": "elv", "context": {"cluster": "elv", "user": name}}],
            "current-context": "elv",
        }
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        return path

    def _etcd(self) -> None:
        self.ports["etcd"], self.ports["etcd-peer"] = free_port(), free_port()
        client, peer = f"http://127.0.0.1:{self.ports['etcd']}", f"http://127.0.0.1:{self.ports['etcd-peer']}"
        argv = [os.path.join(BIN, "etcd"), "--name", "elv", "--data-dir", self.p("etcd")]
        argv += ["--listen-client-urls", client, "--advertise-client-urls", client, "--listen-peer-urls", peer]
        argv += ["--initial-advertise-peer-urls", peer, "--initial-cluster", f"elv={peer}", "--unsafe-no-fsync"]
        self.start("etcd", [*argv, "--log-level", "warn", "--listen-metrics-urls", ""])
        # Waited for by the API server, which retries.

    def _nodes(self) -> None:
        for n in self.nodes:
            n.api_port = self.ports["apiserver"]
            n.make_pool()
            self.save()
            holder = self.start(f"holder@{n.name}", n.holder_argv())
            n.adopt(holder.pid)
            self.save()
            n.network(self.bridge)
            n.mounts()
            n.cgroups()
            self.save()
            self.start(f"containerd@{n.name}", n.containerd_argv(), n.containerd_env())

    def _apiserver(self) -> None:
        pki = Pki(self.p("pki"))
        self.start(
            "kube-apiserver",
            [
                os.path.join(BIN, "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                f"--bind-address={self.gateway}",
                f"--advertise-address={self.gateway}",
                f"--secure-port={self.ports['apiserver']}",
                f"--tls-cert-file={pki.path('apiserver.crt')}",
                f"--tls-private-key-file={pki.path('apiserver.key')}",
                f"--client-ca-file={pki.path('ca.crt')}",
                f"--kubelet-client-certificate={pki.path('apiserver-kubelet.crt')}",
                f"--kubelet-client-key={pki.path('apiserver-kubelet.key')}",
                f"--kubelet-certificate-authority={pki.path('ca.crt')}",
                "--kubelet-preferred-address-types=InternalIP",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki.path('sa.pub')}",
                f"--service-account-signing-key-file={pki.path('sa.key')}",
                f"--service-cluster-ip-range={SERVICE_RANGE}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                f"--cert-dir={self.p('pki', 'apiserver-certs')}",
            ],
        )
        api = self.api()

        def ready() -> bool:
            self.check_alive()
            return api.get("/readyz") == "ok"

        wait_for("kube-apiserver /readyz", ready, 180, 0.25)

    def _controllers(self) -> None:
        pki = Pki(self.p("pki"))
        kc = self.p("kubeconfig", "controller-manager.kubeconfig")
        self.ports["kcm"], self.ports["scheduler"] = free_port(), free_port()
        self.start(
            "kube-controller-manager",
            [
                os.path.join(BIN, "kube-controller-manager"),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['kcm']}",
                "--leader-elect=false",
                f"--service-account-private-key-file={pki.path('sa.key')}",
                f"--root-ca-file={pki.path('ca.crt')}",
                f"--cluster-signing-cert-file={pki.path('ca.crt')}",
                f"--cluster-signing-key-file={pki.path('ca.key')}",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={SERVICE_RANGE}",
                f"--cert-dir={self.p('pki', 'kcm-certs')}",
                # Its default is on the host (/usr/libexec/kubernetes/...), which it would create.
                f"--flex-volume-plugin-dir={self.p('kcm-flexvolume')}",
            ],
        )
        ks = self.p("kubeconfig", "scheduler.kubeconfig")
        self.start(
            "kube-scheduler",
            [
                os.path.join(BIN, "kube-scheduler"),
                f"--kubeconfig={ks}",
                f"--authentication-kubeconfig={ks}",
                f"--authorization-kubeconfig={ks}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['scheduler']}",
                "--leader-elect=false",
                f"--cert-dir={self.p('pki', 'scheduler-certs')}",
            ],
        )

    def _import(self, archives: list[str]) -> None:
        """The built images and the test images into every node's containerd, in parallel."""
        tar = self.p("test-images.tar")
        tar_image(tar, self.images)
        errors: list[str] = []

        def one(n: Node) -> None:
            try:
                n.wait_containerd(self.check_alive)
                for a in [tar, *archives]:
                    run(n.ctr("images", "import", "--no-unpack", a), timeout=600)
            except Exception as e:
                errors.append(f"{n.name}: {e}")

        threads = [threading.Thread(target=one, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os.unlink(tar)
        if errors:
            raise ClusterError("image import failed: " + "; ".join(errors))

    def import_images(self, images: dict[str, dict[str, Any]]) -> None:
        """More busybox-based images, with these tags and configs, on every node."""
        tar = self.p("extra-images.tar")
        tar_image(tar, images)
        for n in self.nodes:
            run(n.ctr("images", "import", "--no-unpack", tar))
        os.unlink(tar)

    def retag_image(self, node: Node, ref: str, new: str) -> None:
        """Give an image of the node's containerd a second tag (a "new" image to roll to)."""
        full = [x if "/" in x else f"docker.io/library/{x}" for x in (ref, new)]
        run(node.ctr("images", "tag", "--force", *full))

    def deploy_objects(self) -> list[dict[str, Any]]:
        """What the cluster applies from deploy/: the loop overlay and the snapshot-controller."""
        return kustomize("deploy/overlays/loop") + kustomize("deploy/snapshot-controller")

    def _objects(self) -> None:
        # CRDs first; the snapshot classes need them established.
        self.kubectl("apply", "--server-side", "-f", CRDS)
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", CRDS)
        doc = dump_all(self.deploy_objects())

        def apply() -> bool:
            # The first apply may race the RBAC bootstrap; retry until clean.
            return self.kubectl("apply", "--server-side", "-f", "-", input=doc, check=False).returncode == 0

        wait_for("deploy/ objects applied", apply, 60, 0.5)

    def _kubelets(self) -> None:
        pki = Pki(self.p("pki"))
        for n in self.nodes:
            cfg = n.kubelet_config(
                pki.path("ca.crt"), pki.path(f"kubelet-serving-{n.name}.crt"), pki.path(f"kubelet-serving-{n.name}.key")
            )
            path = n.p("kubelet-config.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(cfg, f)
            argv = [os.path.join(BIN, "kubelet"), f"--config={path}"]
            argv += [f"--kubeconfig={self.p('kubeconfig', f'kubelet-{n.name}.kubeconfig')}"]
            argv += [f"--hostname-override={n.name}", f"--node-ip={n.ip}", "--v=2"]
            self.start(f"kubelet@{n.name}", n.ns(*argv))

    def _ready(self) -> None:
        api = self.api()
        names = {n.name for n in self.nodes}

        def nodes_ready() -> bool:
            self.check_alive()
            ready = set()
            for n in api.get("/api/v1/nodes")["items"]:
                conds = {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
                if conds.get("Ready") == "True":
                    ready.add(n["metadata"]["name"])
            return names <= ready

        wait_for("every node Ready", nodes_ready, 180, 0.5)

        def plugin_ready() -> bool:
            self.check_alive()
            return names <= {n for n, ready in self.plugin_pods().values() if ready}

        wait_for("the elv-node DaemonSet ready on every node", plugin_ready, 300, 0.5)

        def csinodes() -> bool:
            found = set()
            for cn in api.get("/apis/storage.k8s.io/v1/csinodes")["items"]:
                if any(d["name"] == DRIVER for d in cn["spec"].get("drivers") or []):
                    found.add(cn["metadata"]["name"])
            return names <= found

        wait_for("a CSINode with elv.csi.dev on every node", csinodes, 120, 0.25)
        wait_for(
            "the default ServiceAccount",
            lambda: api.maybe("/api/v1/namespaces/default/serviceaccounts/default"),
            60,
            0.25,
        )

    def diagnose(self) -> str:
        """What to look at when the cluster is not as expected: every pod's
        state, recent warning events and the node plugin's logs."""
        out = []
        for argv in (
            ["get", "pods", "-A", "-o", "wide"],
            ["get", "events", "-A", "--field-selector=type=Warning"],
            [
                "logs",
                "-n",
                NAMESPACE,
                "-l",
                "app.kubernetes.io/name=elv-node",
                "--all-containers",
                "--prefix",
                "--tail=15",
            ],
        ):
            p = self.kubectl(*argv, check=False, timeout=60)
            out.append(f"$ kubectl {' '.join(argv)}\n{p.stdout[-6000:]}{p.stderr[-1000:]}")
        return "\n".join(out)

    def plugin_pods(self) -> dict[str, tuple[str, bool]]:
        """The node plugin's pods: name -> (node, every container ready)."""
        pods = self.api().get(f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector=app.kubernetes.io%2Fname%3Delv-node")
        out = {}
        for p in pods["items"]:
            st = p.get("status", {})
            ready = st.get("phase") == "Running" and all(c.get("ready") for c in st.get("containerStatuses") or [{}])
            out[p["metadata"]["name"]] = (
                p["spec"].get("nodeName", ""),
                ready and not p["metadata"].get("deletionTimestamp"),
            )
        return out

    # -- tear-down

    def down(self) -> list[str]:
        """Stop and remove everything; returns what could not be removed."""
        if self.alive("kube-apiserver"):
            with contextlib.suppress(Exception):
                self._drain()
        for name in ("kube-scheduler", "kube-controller-manager"):
            self.stop(name)
        for n in self.nodes:
            self.stop(f"kubelet@{n.name}")
            self._remove_containers(n)
            self.stop(f"containerd@{n.name}")
            n.kill_all()
        self.stop("kube-apiserver")
        self.stop("etcd")
        for name in list(self.procs):
            self.stop(name, 5)
        problems: list[str] = []
        for n in self.nodes:
            problems += n.release()
        if link_exists(self.bridge) and self.before.get("bridge") == self.bridge:
            run(["ip", "link", "delete", self.bridge], check=False)
        for s, v in self.before.get("sysctls", {}).items():
            if v is not None and read_sysctl(s) != v:
                with contextlib.suppress(OSError), open(f"/proc/sys/{s}", "w") as f:
                    f.write(v)
        left = problems + self.leftovers()
        if not left:
            shutil.rmtree(self.root, ignore_errors=True)
        return left

    def _drain(self) -> None:
        """Delete the test's pods while the node plugin still runs, so their
        volumes are unpublished and unstaged by the driver, as in real life."""
        api = self.api()
        for ns in api.get("/api/v1/namespaces")["items"]:
            name = ns["metadata"]["name"]
            if name in (NAMESPACE, "kube-system"):
                continue
            for pod in api.get(f"/api/v1/namespaces/{name}/pods")["items"]:
                # Not 0: that removes the object at once, before kubelet has
                # torn the pod's volumes down.
                api.request(
                    "DELETE", f"/api/v1/namespaces/{name}/pods/{pod['metadata']['name']}", {"gracePeriodSeconds": 1}
                )

        def gone() -> bool:
            pods = api.get("/api/v1/pods")["items"]
            return all(p["metadata"]["namespace"] in (NAMESPACE, "kube-system") for p in pods)

        with contextlib.suppress(ClusterError):
            wait_for("the test's pods gone", gone, 60, 0.5)

    def _remove_containers(self, n: Node) -> None:
        if not self.alive(f"containerd@{n.name}"):
            return
        tasks = run(n.ctr("tasks", "ls", "-q"), check=False, timeout=30).stdout.split()
        for t in tasks:
            run(n.ctr("tasks", "kill", "-s", "SIGKILL", t), check=False, timeout=30)

    def leftovers(self) -> list[str]:
        """Everything of this cluster still on the host; empty after a clean down()."""
        left = [f"process {name} ({p.pid})" for name, p in self.procs.items() if pid_alive(p.pid)]
        for n in self.nodes:
            left += n.leftovers()
        if link_exists(self.bridge) and self.before.get("bridge") == self.bridge:
            left.append(f"link {self.bridge}")
        left += [f"mount {m}" for m in mounts_under(self.root)]
        return left


def new_root() -> str:
    return tempfile.mkdtemp(prefix="elv-k8s-", dir="/tmp")


@contextlib.contextmanager
def cluster(nodes: int = 3) -> Iterator[Cluster]:
    c = Cluster(new_root(), nodes)
    try:
        c.up()
        yield c
    finally:
        left = c.down()
        if left:
            raise ClusterError("left behind:\n  " + "\n  ".join(left))


USAGE = """usage: scripts/k8s-cluster up [--nodes N]     start a cluster (3 nodes unless N)
       scripts/k8s-cluster down [ROOT...]     stop it and remove everything it made (no ROOT:
                                              every cluster `up` started, and every stale one)
       scripts/k8s-cluster leftovers ROOT     what a cluster left on this machine"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "down", "leftovers"):
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "up":
        n = 3
        if argv[1:2] == ["--nodes"] and len(argv) == 3 and argv[2].isdigit() and int(argv[2]) >= 1:
            n = int(argv[2])
        elif argv[1:]:
            print(USAGE, file=sys.stderr)
            return 2
        c = Cluster(new_root(), n, origin="k8s-cluster")
        try:
            c.up()
        except BaseException:
            if c.alive("kube-apiserver"):
                print(c.diagnose(), file=sys.stderr)
            left = c.down()
            if left:
                print("left behind: " + ", ".join(left), file=sys.stderr)
            raise
        print(f"export KUBECONFIG={c.kubeconfig}")
        print(f"# root: {c.root}; nodes {', '.join(x.name for x in c.nodes)}; logs in {c.p('logs')}")
        print(f"# tear down with: scripts/k8s-cluster down {c.root}")
        return 0
    return _down_or_list(argv[0], argv[1:])


def _down_or_list(what: str, roots: list[str]) -> int:
    from tests.reap import stale_clusters

    clusters: list[Cluster] = []
    if roots:
        clusters = [Cluster.load(r) for r in roots]
    else:
        # Clusters this command started, and stale ones; never a running test's.
        stale = {c.root for c in stale_clusters()}
        for d in sorted(os.listdir("/tmp")):
            path = os.path.join("/tmp", d)
            if d.startswith("elv-k8s-") and os.path.isfile(os.path.join(path, "state.json")):
                with contextlib.suppress(ClusterError, KeyError, ValueError):
                    c = Cluster.load(path)
                    if c.origin == "k8s-cluster" or c.root in stale:
                        clusters.append(c)
    rc = 0
    for c in clusters:
        left = c.down() if what == "down" else c.leftovers()
        for x in left:
            print(f"{c.root}: {x}")
        rc |= bool(left)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
