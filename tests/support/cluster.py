"""A one-node Kubernetes cluster made of host processes, for ELV's cluster test.

Everything runs on this machine, bound to 127.0.0.1, under one scratch root
(``/tmp/elv-k8s-XXXXXX``): etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, a private containerd (Debian's, with its own config, state
and socket), kubelet, the ELV driver (``python -m csi serve``) and its
sidecars. Nothing is pulled: the pod images are made here from Debian's
busybox-static and imported with ``ctr``.

The driver and sidecar flags are not restated here: they are read from the
DaemonSet in ``deploy/overlays/loop`` and the container paths in them are
mapped onto the scratch root (see ``HostPaths``), so the test runs what the
manifests say. Each sidecar authenticates with a client certificate whose
subject is its pod's ServiceAccount, so the RBAC from ``deploy/`` is what
authorises it: a missing rule shows up as a ``forbidden`` error in its log.

Everything the cluster changes on the host is recorded in ``state.json``
before it is changed, so ``down()`` (also from another process, see
scripts/k8s-cluster) removes exactly that: processes, containerd shims,
mounts, loop devices, network namespaces, the CNI bridge, iptables rules and
chains, cgroups, sysctls and the files and directories it created.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from tests.support.paths import REPO

TOOLS = os.environ.get("ELV_TOOLS", os.path.expanduser("~/.cache/elv-tools"))
BIN = os.path.join(TOOLS, "bin")
# The snapshot CRDs come from the external-snapshotter client/v8 module, fetched
# by scripts/k8s-tools into the tool cache (never copied into the repository).
CRDS = os.path.join(os.environ.get("ELV_TOOLS", os.path.expanduser("~/.cache/elv-tools")), "crds")
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
DRIVER = "elv.csi.dev"
NAMESPACE = "elv-system"
SA = "elv-node"
# The node name is its address, as in Kubernetes' hack/local-up-cluster.sh:
# kubelet refuses a loopback --node-ip, so the API server reaches kubelet
# (exec, logs) through the Hostname address, which must then be 127.0.0.1.
NODE = "127.0.0.1"
BRIDGE = "elvk8s0"
# The pod network: a private /24 on a bridge only pods are on. Nothing
# sends traffic to it (kubectl exec goes through kubelet on 127.0.0.1).
POD_SUBNET = "10.203.77.0/24"
SERVICE_RANGE = "10.203.78.0/24"
BUSYBOX = "elv.test/busybox:1.35"
PAUSE = "elv.test/pause:3.10"
CNI_DIR = "/usr/lib/cni"
KUBELET_ALIAS = "/var/lib/kubelet"

K8S_BINS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl")
SIDECAR_BINS = ("csi-provisioner", "csi-resizer", "csi-snapshotter", "snapshot-controller", "elv-registrar")
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "openssl", "iptables-save", "iptables", "ip")
SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops", "net/ipv4/ip_forward")


class ClusterError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"k8s-cluster: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(argv: list[str], check: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and p.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p


def wait_for(what: str, fn: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = fn()
        except Exception as e:
            last = e
            v = None
        if v:
            return v
        time.sleep(interval)
    raise ClusterError(
        f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})" if last else "")
    )


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run the cluster; empty when all is there."""
    out = []
    if os.geteuid() != 0:
        out.append("root (mounts, loop devices, containers)")
    out += [f"{BIN}/{b} (build it with scripts/k8s-tools)" for b in K8S_BINS + SIDECAR_BINS if not _runnable(BIN, b)]
    out += [f"{t} (install it with scripts/setup-k8s)" for t in HOST_TOOLS if shutil.which(t) is None]
    out += [
        f"{CNI_DIR}/{p} (containernetworking-plugins; scripts/setup-k8s)"
        for p in ("bridge", "host-local", "loopback")
        if not _runnable(CNI_DIR, p)
    ]
    if not _static_busybox():
        out.append("a static /bin/busybox (busybox-static; scripts/setup-k8s)")
    if not os.access(PYTHON, os.X_OK):
        out.append(f"{PYTHON} (scripts/setup)")
    if not os.path.isdir(CRDS):
        out.append(CRDS)
    return out


def _runnable(directory: str, name: str) -> bool:
    return os.access(os.path.join(directory, name), os.X_OK)


def _static_busybox() -> bool:
    # No `file` needed: a static ELF has no PT_INTERP program header.
    try:
        with open("/bin/busybox", "rb") as f:
            data = f.read(1 << 16)
    except OSError:
        return False
    return data[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in data and b"/lib/ld-linux" not in data


# ---------------------------------------------------------------- images


def _tar_image(path: str, images: dict[str, dict[str, Any]]) -> None:
    """A docker-archive tarball: one busybox layer, several tagged configs."""
    import hashlib
    import io
    import tarfile

    def add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(data), mode, 0
        tar.addfile(ti, io.BytesIO(data))

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.GNU_FORMAT) as t:
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root", "mnt"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755, 0
            t.addfile(ti)
        with open("/bin/busybox", "rb") as f:
            add(t, "bin/busybox", f.read(), 0o755)
        applets = run(["/bin/busybox", "--list"]).stdout.split()
        for a in sorted(set(applets) - {"busybox"}):
            ti = tarfile.TarInfo(f"bin/{a}")
            ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, "busybox", 0o777, 0
            t.addfile(ti)
        add(t, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add(t, "etc/group", b"root:x:0:\nnobody:x:65534:\n")
    blob = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(blob).hexdigest()
    manifest = []
    with tarfile.open(path, "w") as tar:
        add(tar, "layer.tar", blob)
        for tag, cfg in images.items():
            config = {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Env": ["PATH=/bin"], **cfg},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created_by": "tests/support/cluster.py from busybox-static"}],
            }
            data = json.dumps(config, sort_keys=True).encode()
            name = hashlib.sha256(data).hexdigest() + ".json"
            add(tar, name, data)
            manifest.append({"Config": name, "RepoTags": [tag], "Layers": ["layer.tar"]})
        add(tar, "manifest.json", json.dumps(manifest).encode())


def image_set(extra: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    images: dict[str, dict[str, Any]] = {
        BUSYBOX: {"Cmd": ["sh"]},
        # The sandbox ("pause") container only has to sit there; containerd
        # stops it with SIGKILL.
        PAUSE: {"Entrypoint": ["/bin/sleep", "2147483647"]},
    }
    images.update(extra or {})
    return images


# ---------------------------------------------------------------- certificates


#: openssl req: a new P-256 key, unencrypted.
EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass
class Pki:
    dir: str

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def ca(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        argv = ["openssl", "req", "-x509", *EC_KEY, "-keyout", self.path("ca.key"), "-out", self.path("ca.crt")]
        argv += ["-days", "2", "-subj", "/CN=elv-k8s-test-ca", "-addext", "basicConstraints=critical,CA:TRUE"]
        run([*argv, "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        # The service-account token signing key (RS256).
        run(
            ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", self.path("sa.key")]
        )
        run(["openssl", "pkey", "-in", self.path("sa.key"), "-pubout", "-out", self.path("sa.pub")])

    def cert(self, name: str, subject: str, sans: str = "", server: bool = False) -> tuple[str, str]:
        key, csr, crt, ext = (self.path(f"{name}.{x}") for x in ("key", "csr", "crt", "ext"))
        run(["openssl", "req", "-new", *EC_KEY, "-keyout", key, "-out", csr, "-subj", subject])
        usage = "serverAuth" if server else "clientAuth"
        lines = [
            "basicConstraints=CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={usage}",
        ]
        if sans:
            lines.append(f"subjectAltName={sans}")
        with open(ext, "w") as f:
            f.write("\n".join(lines) + "\n")
        argv = ["openssl", "x509", "-req", "-in", csr, "-CA", self.path("ca.crt"), "-CAkey", self.path("ca.key")]
        run([*argv, "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext])
        os.unlink(csr)
        os.unlink(ext)
        return crt, key


def sa_subject(namespace: str, name: str) -> str:
    """A client certificate subject that authenticates as a ServiceAccount."""
    return f"/O=system:serviceaccounts/O=system:serviceaccounts:{namespace}/CN=system:serviceaccount:{namespace}:{name}"


# ---------------------------------------------------------------- API client


class Api:
    """A small JSON client for the API server (client certificate auth)."""

    def __init__(self, server: str, ca: str, cert: str, key: str) -> None:
        self.server = server
        self.ctx = ssl.create_default_context(cafile=ca)
        self.ctx.load_cert_chain(cert, key)

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=30) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace")) from None
        ct = r.headers.get("Content-Type", "")
        return json.loads(raw) if raw and "json" in ct else raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def maybe(self, path: str) -> Any:
        try:
            return self.get(path)
        except ApiError as e:
            if e.code == 404:
                return None
            raise

    def create(self, path: str, obj: Any) -> Any:
        return self.request("POST", path, obj)

    def delete(self, path: str) -> Any:
        try:
            return self.request("DELETE", path)
        except ApiError as e:
            if e.code != 404:
                raise
            return None

    def patch(self, path: str, obj: Any) -> Any:
        return self.request("PATCH", path, obj, "application/merge-patch+json")


class ApiError(ClusterError):
    def __init__(self, code: int, body: str) -> None:
        super().__init__(f"HTTP {code}: {body[:500]}")
        self.code = code


# ---------------------------------------------------------------- manifests


def kustomize(path: str) -> list[dict[str, Any]]:
    out = run([os.path.join(BIN, "kubectl"), "kustomize", os.path.join(REPO, path)]).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@dataclass
class HostPaths:
    """Container paths of the node plugin pod, mapped onto the scratch root."""

    kubelet: str
    pool: str
    run: str

    def mapping(self) -> list[tuple[str, str]]:
        # Longest first.
        return [
            ("/var/lib/kubelet/plugins_registry", f"{self.kubelet}/plugins_registry"),
            ("/var/lib/kubelet", self.kubelet),
            ("/registration", f"{self.kubelet}/plugins_registry"),
            ("/csi", f"{self.kubelet}/plugins/{DRIVER}"),
            ("/var/lib/elv", self.pool),
            ("/run/elv", self.run),
        ]

    def value(self, v: str) -> str:
        scheme = ""
        if v.startswith("unix://"):
            scheme, v = "unix://", v[len("unix://") :]
        for c, h in self.mapping():
            if v == c or v.startswith(c + "/"):
                return scheme + h + v[len(c) :]
        return scheme + v


def host_args(args: list[str], paths: HostPaths, env: dict[str, str], ports: dict[str, int]) -> list[str]:
    """Container args -> host process args: paths mapped, ports made free and local."""
    out = []
    for a in args:
        for k, v in env.items():
            a = a.replace(f"$({k})", v)
        if a.startswith("--") and "=" in a:
            flag, v = a.split("=", 1)
            if flag in ("--http-endpoint", "--metrics-address", "--health-port"):
                ports[flag] = free_port()
                v = f"127.0.0.1:{ports[flag]}"
            elif v.startswith("/") or v.startswith("unix:///"):
                v = paths.value(v)
            a = f"{flag}={v}"
        out.append(a)
    return out


# ---------------------------------------------------------------- host state


def mounts_under(root: str) -> list[str]:
    real = os.path.realpath(root)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == real or mp.startswith(real + "/"):
                found.append(mp)
    return found


def loops_under(root: str) -> list[str]:
    real = os.path.realpath(root)
    found = []
    for d in sorted(os.listdir("/sys/block")):
        bf = f"/sys/block/{d}/loop/backing_file"
        with contextlib.suppress(OSError), open(bf) as f:
            b = f.read().strip()
            if b.startswith(real + "/") or (b.endswith(" (deleted)") and real in b):
                found.append(f"/dev/{d} -> {b}")
    return found


def netns_list() -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(os.listdir("/var/run/netns"))
    return []


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def veths_on(bridge: str) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(os.listdir(f"/sys/class/net/{bridge}/brif"))
    return []


BUILTIN_CHAINS = frozenset({"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"})


def iptables_rules(cmd: str) -> dict[str, list[str]]:
    """table -> its chain declarations and rules, as iptables-save prints them."""
    if shutil.which(cmd) is None:
        return {}
    p = run([cmd], check=False)
    out: dict[str, list[str]] = {}
    table = ""
    for line in p.stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
            out[table] = []
        elif line.startswith((":", "-A ")) and table:
            line = re.sub(r" \[\d+:\d+\]$", "", line)
            # A built-in chain with its default policy is no trace of ours (the
            # table merely got loaded).
            if line.startswith(":") and line.split()[0][1:] in BUILTIN_CHAINS and line.endswith(" ACCEPT"):
                continue
            out[table].append(line)
    return out


def cgroup_dirs() -> list[str]:
    out = []
    base = "/sys/fs/cgroup"
    with contextlib.suppress(FileNotFoundError):
        for c in sorted(os.listdir(base)):
            d = os.path.join(base, c)
            if os.path.isdir(d) and not os.path.islink(d):
                out += [os.path.join(d, x) for x in sorted(os.listdir(d)) if os.path.isdir(os.path.join(d, x))]
    return out


def kubepods_cgroups() -> list[str]:
    return [d for d in cgroup_dirs() if os.path.basename(d).startswith("kubepods")]


def read_sysctl(name: str) -> str | None:
    try:
        with open(f"/proc/sys/{name}") as f:
            return f.read().strip()
    except OSError:
        return None


def pids_with(needle: str) -> list[int]:
    """Processes whose command line holds ``needle`` (a path unique to one cluster)."""
    found = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            found.append(int(d))
    return found


# Host paths outside the scratch root that kubelet, containerd or CNI may
# create (hard-coded in them). Whatever did not exist before is removed after.
HOST_PATHS = (
    "/var/run/netns",
    "/run/containerd",
    "/var/lib/cni",
    "/var/log/containers",
    "/var/log/pods",
    "/etc/cni",
    "/opt/cni",
    "/opt/containerd",
    "/var/lib/kubelet",
    "/usr/libexec/kubernetes",
    "/run/elv",
)


# ---------------------------------------------------------------- the cluster


@dataclass
class Proc:
    name: str
    pid: int
    log: str


@dataclass
class Cluster:
    root: str
    node: str = NODE
    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    before: dict[str, Any] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=image_set)
    # Popen objects of the processes this object started (not saved: down()
    # from another process works on pids alone).
    popens: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    # -- paths

    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def kubelet_dir(self) -> str:
        return self.p("kubelet")

    @property
    def pool(self) -> str:
        return self.p("elv", "loop")

    @property
    def containerd_sock(self) -> str:
        return self.p("containerd", "containerd.sock")

    @property
    def kubeconfig(self) -> str:
        return self.p("kubeconfig", "admin.kubeconfig")

    @property
    def host_paths(self) -> HostPaths:
        return HostPaths(self.kubelet_dir, self.p("elv"), self.p("run-elv"))

    @property
    def csi_socket(self) -> str:
        return os.path.join(self.kubelet_dir, "plugins", DRIVER, "csi.sock")

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def api(self) -> Api:
        pki = Pki(self.p("pki"))
        return Api(self.server, pki.path("ca.crt"), pki.path("admin.crt"), pki.path("admin.key"))

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [os.path.join(BIN, "kubectl"), "--kubeconfig", self.kubeconfig, *args]
        return run(argv, check=check, timeout=timeout, input=input)

    # -- state file (for down() from another process)

    def save(self) -> None:
        state = {
            "root": self.root,
            "node": self.node,
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
        c = cls(root=s["root"], node=s["node"], ports=s["ports"], before=s["before"])
        c.procs = {k: Proc(**v) for k, v in s["procs"].items()}
        return c

    # -- processes

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        os.makedirs(self.p("logs"), exist_ok=True)
        path = self.p("logs", f"{name}.log")
        with open(path, "ab") as out:
            e = {
                "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": self.root,
                "LC_ALL": "C.UTF-8",
                **(env or {}),
            }
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=e,
                cwd=self.root,
                start_new_session=True,
            )
        p = Proc(name, proc.pid, path)
        self.popens[proc.pid] = proc
        self.procs[name] = p
        self.save()
        return p

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        if p is None:
            return False
        try:
            os.kill(p.pid, 0)
        except ProcessLookupError:
            return False
        popen = self.popens.get(p.pid)
        if popen is not None:
            return popen.poll() is None
        try:
            with open(f"/proc/{p.pid}/stat") as f:
                return f.read().split(") ")[-1][0] != "Z"
        except OSError:
            return False

    def check_alive(self) -> None:
        for name in self.procs:
            if not self.alive(name):
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
        self._kill_group(p.pid, timeout)
        popen = self.popens.pop(p.pid, None)
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=5)

    @staticmethod
    def _kill_group(pid: int, timeout: float) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                try:
                    os.kill(pid, 0)
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().split(") ")[-1][0] == "Z":
                            break
                except (ProcessLookupError, FileNotFoundError):
                    return
                time.sleep(0.05)
            else:
                continue
            return

    # -- bring-up

    def record_host_state(self) -> None:
        self.before = {
            "paths": {p: os.path.lexists(p) for p in HOST_PATHS},
            "netns": netns_list(),
            "iptables": iptables_rules("iptables-save"),
            "ip6tables": iptables_rules("ip6tables-save"),
            "cgroups": kubepods_cgroups(),
            "sysctls": {s: read_sysctl(s) for s in SYSCTLS},
            "bridge": link_exists(BRIDGE),
            "var_log_containers": sorted(os.listdir("/var/log/containers"))
            if os.path.isdir("/var/log/containers")
            else [],
        }
        if self.before["bridge"]:
            raise ClusterError(f"link {BRIDGE} already exists: another test cluster is up (scripts/k8s-cluster down)")
        self.save()

    def up(self) -> Cluster:
        t0 = time.monotonic()
        missing = missing_prerequisites()
        if missing:
            raise ClusterError("missing prerequisites:\n  " + "\n  ".join(missing))
        self.record_host_state()

        def step(name: str, fn: Callable[[], None]) -> None:
            s = time.monotonic()
            fn()
            self.timings[name] = round(time.monotonic() - s, 2)
            log(f"{name}: {self.timings[name]:.2f} s")

        step("certificates", self._pki)
        step("etcd", self._etcd)
        step("containerd", self._containerd)  # starts while the apiserver comes up
        step("kube-apiserver", self._apiserver)
        step("controllers", self._controllers)
        step("deploy objects", self._objects)
        step("images", self._images)
        step("kubelet", self._kubelet)
        step("node plugin", self._node_plugin)
        step("node ready", self._ready)
        self.timings["up"] = round(time.monotonic() - t0, 2)
        log(f"cluster up in {self.timings['up']:.1f} s (root {self.root})")
        return self

    def _pki(self) -> None:
        pki = Pki(self.p("pki"))
        pki.ca()
        pki.cert(
            "apiserver",
            "/CN=kube-apiserver",
            "IP:127.0.0.1,IP:10.203.78.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc",
            server=True,
        )
        pki.cert("kubelet-serving", f"/CN={self.node}", "IP:127.0.0.1,DNS:localhost", server=True)
        clients = {
            "admin": "/O=system:masters/CN=elv-test-admin",
            "apiserver-kubelet": "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "controller-manager": "/CN=system:kube-controller-manager",
            "scheduler": "/CN=system:kube-scheduler",
            "kubelet": f"/O=system:nodes/CN=system:node:{self.node}",
            "elv-node": sa_subject(NAMESPACE, SA),
            "snapshot-controller": sa_subject("kube-system", "snapshot-controller"),
        }
        self.ports["apiserver"] = free_port()
        os.makedirs(self.p("kubeconfig"), exist_ok=True)
        for name, subj in clients.items():
            crt, key = pki.cert(name, subj)
            self._kubeconfig(name, crt, key)

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

        def healthy() -> bool:
            self.check_alive()
            with urllib.request.urlopen(f"{client}/health", timeout=2) as r:
                return bool(json.loads(r.read()).get("health") == "true")

        wait_for("etcd", healthy, 60)

    def _apiserver(self) -> None:
        pki = Pki(self.p("pki"))
        self.start(
            "kube-apiserver",
            [
                os.path.join(BIN, "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports['apiserver']}",
                f"--tls-cert-file={pki.path('apiserver.crt')}",
                f"--tls-private-key-file={pki.path('apiserver.key')}",
                f"--client-ca-file={pki.path('ca.crt')}",
                f"--kubelet-client-certificate={pki.path('apiserver-kubelet.crt')}",
                f"--kubelet-client-key={pki.path('apiserver-kubelet.key')}",
                f"--kubelet-certificate-authority={pki.path('ca.crt')}",
                "--kubelet-preferred-address-types=Hostname",
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

        wait_for("kube-apiserver /readyz", ready, 120, 0.25)

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

    def node_plugin_objects(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """What the cluster creates from deploy/: everything but the workloads, and the DaemonSet."""
        objs = kustomize("deploy/overlays/loop") + [
            d for d in kustomize("deploy/snapshot-controller") if d["kind"] not in ("CustomResourceDefinition",)
        ]
        ds = next(o for o in objs if o["kind"] == "DaemonSet")
        keep = [o for o in objs if o["kind"] not in ("DaemonSet", "Deployment")]
        return keep, ds

    def _objects(self) -> None:
        # CRDs first; the VolumeSnapshotClass needs them established.
        self.kubectl("apply", "--server-side", "-f", CRDS)
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", CRDS)
        keep, _ = self.node_plugin_objects()
        doc = "\n---\n".join(yaml.safe_dump(o) for o in keep)

        def apply() -> bool:
            # The first apply may race the RBAC bootstrap; retry until clean.
            return self.kubectl("apply", "--server-side", "-f", "-", input=doc, check=False).returncode == 0

        wait_for("deploy/ objects applied", apply, 60, 0.5)

    def _containerd(self) -> None:
        d = self.p("containerd")
        os.makedirs(d, exist_ok=True)
        cni = self.p("cni")
        os.makedirs(cni, exist_ok=True)
        conf = {
            "cniVersion": "0.4.0",
            "name": "elv-k8s",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": False,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]], "dataDir": self.p("cni-ipam")},
                },
                {"type": "loopback"},
            ],
        }
        # host-local's dataDir must exist; loopback is listed for clarity.
        with open(os.path.join(cni, "10-elv.conflist"), "w") as f:
            json.dump(conf, f, indent=1)
        self.ports["stream"] = free_port()
        config = f"""version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.containerd_sock}"
[ttrpc]
  address = "{self.containerd_sock}.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "{self.ports["stream"]}"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_DIR}"
    conf_dir = "{cni}"
    max_conf_num = 1
"""
        with open(os.path.join(d, "config.toml"), "w") as f:
            f.write(config)
        self.start("containerd", ["containerd", "--config", os.path.join(d, "config.toml")])

    def _wait_containerd(self) -> None:
        def up() -> bool:
            self.check_alive()
            return run(["ctr", "-a", self.containerd_sock, "version"], check=False, timeout=10).returncode == 0

        wait_for("containerd", up, 60, 0.2)

    def _images(self) -> None:
        self._wait_containerd()
        self.import_images(self.images)

    def import_images(self, images: dict[str, dict[str, Any]]) -> None:
        """Make busybox-based images with these tags and configs, and import them."""
        tar = self.p("images.tar")
        _tar_image(tar, images)
        run(["ctr", "-a", self.containerd_sock, "-n", "k8s.io", "images", "import", "--no-unpack", tar])
        os.unlink(tar)

    def _kubelet(self) -> None:
        k = self.kubelet_dir
        os.makedirs(k, exist_ok=True)
        # rshared, so mounts the driver makes beneath it reach the containers.
        run(["mount", "--bind", k, k])
        run(["mount", "--make-rshared", k])
        # kubelet's device manager and some e2e specs use /var/lib/kubelet
        # whatever --root-dir says: where it does not exist, it becomes a view
        # of the scratch kubelet dir (removed by down()).
        if not os.path.lexists(KUBELET_ALIAS):
            self.alias_kubelet_dir(KUBELET_ALIAS)
        pki = Pki(self.p("pki"))
        self.ports["kubelet"], self.ports["kubelet-healthz"] = free_port(), free_port()
        cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": self.ports["kubelet"],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.ports["kubelet-healthz"],
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": pki.path("ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": pki.path("kubelet-serving.crt"),
            "tlsPrivateKeyFile": pki.path("kubelet-serving.key"),
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
            "podLogsDir": self.p("pod-logs"),
            "volumePluginDir": self.p("kubelet-volume-plugins"),
            "resolvConf": "",
            "registerNode": True,
            "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "syncFrequency": "3s",
            # NodeGetVolumeStats every 5 s (default 1 min), so kubectl-elv sees use quickly.
            "volumeStatsAggPeriod": "5s",
            "fileCheckFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s",
            "maxPods": 40,
            "protectKernelDefaults": False,
        }
        path = self.p("kubelet-config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        self.start(
            "kubelet",
            [
                os.path.join(BIN, "kubelet"),
                f"--config={path}",
                f"--kubeconfig={self.p('kubeconfig', 'kubelet.kubeconfig')}",
                f"--root-dir={k}",
                f"--hostname-override={self.node}",
                "--v=2",
            ],
        )

    def _node_plugin(self) -> None:
        """The DaemonSet's containers, as host processes with the manifest's flags."""
        _, ds = self.node_plugin_objects()
        paths = self.host_paths
        for d in (paths.pool, paths.run, os.path.join(self.kubelet_dir, "plugins", DRIVER)):
            os.makedirs(d, exist_ok=True)
        env = {"NODE_NAME": self.node, "NAMESPACE": NAMESPACE, "POD_NAME": f"{SA}-host"}
        sa_kc = self.p("kubeconfig", "elv-node.kubeconfig")
        containers = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
        for name, c in containers.items():
            ports: dict[str, int] = {}
            args = host_args(c.get("args", []), paths, env, ports)
            cenv = {e["name"]: env[e["name"]] for e in c.get("env", []) if e["name"] in env}
            if name == "elv":
                argv = [PYTHON, "-m", "csi", "serve", *args]
                cenv["PYTHONPATH"] = REPO
            elif name == "liveness-probe":
                continue  # not built here (not served by the module proxy); see docs/kubernetes.md
            elif name == "node-driver-registrar":
                argv = [os.path.join(BIN, "elv-registrar"), *args]
            else:
                argv = [os.path.join(BIN, name), f"--kubeconfig={sa_kc}", *args]
                if name == "csi-provisioner":
                    # Faster capacity refresh than the manifest's default (1m),
                    # and no owner (there is no pod object to own them).
                    argv = [a for a in argv if not a.startswith("--capacity-ownerref-level=")]
                    argv += ["--capacity-ownerref-level=-1", "--capacity-poll-interval=5s"]
            for k, v in ports.items():
                self.ports[f"{name}{k}"] = v
            self.start(name, argv, cenv)
            if name == "elv":
                wait_for("the driver's socket", lambda: self.check_alive() or os.path.exists(self.csi_socket), 60)
        sc = next(d for d in kustomize("deploy/snapshot-controller") if d["kind"] == "Deployment")
        args = sc["spec"]["template"]["spec"]["containers"][0]["args"]
        args = [a for a in args if not a.startswith("--leader-election")]
        self.start(
            "snapshot-controller",
            [
                os.path.join(BIN, "snapshot-controller"),
                f"--kubeconfig={self.p('kubeconfig', 'snapshot-controller.kubeconfig')}",
                *args,
            ],
        )

    def _ready(self) -> None:
        api = self.api()

        def node_ready() -> bool:
            self.check_alive()
            n = api.maybe(f"/api/v1/nodes/{self.node}")
            if not n:
                return False
            conds = {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
            return conds.get("Ready") == "True"

        wait_for("node Ready", node_ready, 120, 0.25)

        def csinode() -> bool:
            self.check_alive()
            cn = api.maybe(f"/apis/storage.k8s.io/v1/csinodes/{self.node}")
            return bool(cn and any(d["name"] == DRIVER for d in cn["spec"].get("drivers") or []))

        wait_for("CSINode with elv.csi.dev", csinode, 60, 0.25)

        def sa_token() -> bool:
            # Pods need the default ServiceAccount of their namespace.
            return bool(api.maybe("/api/v1/namespaces/default/serviceaccounts/default"))

        wait_for("default ServiceAccount", sa_token, 60, 0.25)

    def alias_kubelet_dir(self, path: str = "/var/lib/kubelet") -> None:
        """Make kubelet's root dir visible at ``path`` too (a private bind mount).

        Some e2e specs look at /var/lib/kubelet/pods on the node, hard-coded.
        Only done where ``path`` does not exist; down() removes it.
        """
        if os.path.lexists(path):
            raise ClusterError(f"{path} exists: the cluster cannot put its kubelet dir there")
        self.before.setdefault("aliases", []).append(path)
        self.save()
        os.makedirs(path)
        run(["mount", "--bind", self.kubelet_dir, path])
        # Private: the files show through, the driver's mounts do not (a
        # peer would show every staging mount twice, and the driver would
        # rightly refuse to unstage a volume still mounted elsewhere).
        run(["mount", "--make-private", path])

    # -- tear-down

    def down(self) -> list[str]:
        """Stop and remove everything; returns what could not be removed."""
        problems: list[str] = []
        if "kube-apiserver" in self.procs and self.alive("kube-apiserver") and self.alive("kubelet"):
            with contextlib.suppress(Exception):
                self._drain()
        order = [
            "kube-scheduler",
            "kube-controller-manager",
            "snapshot-controller",
            "csi-provisioner",
            "csi-resizer",
            "csi-snapshotter",
            "node-driver-registrar",
            "kubelet",
        ]
        for name in order + [
            n for n in self.procs if n not in order and n not in ("containerd", "elv", "etcd", "kube-apiserver")
        ]:
            self.stop(name)
        self._remove_containers()
        self.stop("containerd")
        # Shims outlive containerd; they carry our socket path on their command line.
        for pid in pids_with(self.containerd_sock):
            self._kill_group(pid, 5)
        # Volumes left behind by a failed test: unmount and detach, then the driver.
        self._unmount_all(exclude_pool=True)
        self.stop("elv", timeout=30)
        self.stop("kube-apiserver")
        self.stop("etcd")
        for a in self.before.get("aliases", []):
            if mounts_under(a):
                run(["umount", "-R", a], check=False)
            if mounts_under(a):
                run(["umount", "-R", "-l", a], check=False)
        self._unmount_all()
        for dev in loops_under(self.root):
            run(["losetup", "-d", dev.split()[0]], check=False)
        problems += self._host_cleanup()
        left = self.leftovers()
        if not left:
            shutil.rmtree(self.root, ignore_errors=True)
        return problems + left

    def _drain(self) -> None:
        """Delete every pod, so kubelet tears down their sandboxes (CNI DEL, netns)."""
        api = self.api()
        for ns in api.get("/api/v1/namespaces")["items"]:
            name = ns["metadata"]["name"]
            for pod in api.get(f"/api/v1/namespaces/{name}/pods")["items"]:
                api.request(
                    "DELETE", f"/api/v1/namespaces/{name}/pods/{pod['metadata']['name']}", {"gracePeriodSeconds": 0}
                )

        def sandboxes_gone() -> bool:
            out = run(["ctr", "-a", self.containerd_sock, "-n", "k8s.io", "tasks", "ls", "-q"], check=False).stdout
            return not out.strip() and not veths_on(BRIDGE)

        with contextlib.suppress(ClusterError):
            wait_for("pod sandboxes removed", sandboxes_gone, 60, 0.5)

    def _remove_containers(self) -> None:
        if not os.path.exists(self.containerd_sock) or not self.alive("containerd"):
            return
        ctr = ["ctr", "-a", self.containerd_sock, "-n", "k8s.io"]
        for t in run([*ctr, "tasks", "ls", "-q"], check=False).stdout.split():
            run([*ctr, "tasks", "kill", "-s", "SIGKILL", t], check=False)
            time.sleep(0.2)
            run([*ctr, "tasks", "delete", "-f", t], check=False)
        for c in run([*ctr, "containers", "ls", "-q"], check=False).stdout.split():
            run([*ctr, "containers", "delete", c], check=False)

    def _unmount_all(self, exclude_pool: bool = False) -> None:
        for _ in range(3):
            mps = sorted(mounts_under(self.root), key=len, reverse=True)
            if exclude_pool:
                mps = [m for m in mps if m != os.path.realpath(self.kubelet_dir)]
            if not mps:
                return
            for m in mps:
                if run(["umount", m], check=False).returncode != 0:
                    run(["umount", "-l", m], check=False)

    def _host_cleanup(self) -> list[str]:
        before = self.before
        self._network_cleanup()
        problems: list[str] = []
        for cmd, key in (("iptables", "iptables"), ("ip6tables", "ip6tables")):
            problems += restore_iptables(cmd, before.get(key, {}))
        for cg in sorted(set(kubepods_cgroups()) - set(before.get("cgroups", [])), reverse=True):
            for d in sorted((r for r, _, _ in os.walk(cg)), key=len, reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        for s, v in before.get("sysctls", {}).items():
            if v is not None and read_sysctl(s) != v:
                with contextlib.suppress(OSError), open(f"/proc/sys/{s}", "w") as f:
                    f.write(v)
        self._files_cleanup()
        return problems + self._paths_cleanup()

    def _network_cleanup(self) -> None:
        """Network namespaces the CNI plugins made for our pods, their veths, our bridge."""
        for ns in set(netns_list()) - set(self.before.get("netns", [])):
            if ns.startswith("cni-"):
                run(["ip", "netns", "delete", ns], check=False)
        for v in veths_on(BRIDGE):
            run(["ip", "link", "delete", v], check=False)
        if link_exists(BRIDGE) and not self.before.get("bridge"):
            run(["ip", "link", "delete", BRIDGE], check=False)

    def _files_cleanup(self) -> None:
        old = set(self.before.get("var_log_containers", []))
        if os.path.isdir("/var/log/containers"):
            for e in set(os.listdir("/var/log/containers")) - old:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join("/var/log/containers", e))

    def _paths_cleanup(self) -> list[str]:
        """Host paths the cluster made; what still has mounts under it is left, and reported."""
        problems = []
        for p, existed in self.before.get("paths", {}).items():
            if not existed and os.path.lexists(p):
                if mounts_under(p):
                    problems.append(f"mounts under {p}")
                    continue
                shutil.rmtree(p, ignore_errors=True)
        return problems

    def leftovers(self) -> list[str]:
        """Everything of this cluster still on the host; empty after a clean down()."""
        left = [f"process {n} ({p.pid})" for n, p in self.procs.items() if self.alive(n)]
        left += [f"process {pid} (containerd shim)" for pid in pids_with(self.containerd_sock)]
        left += [f"mount {m}" for m in mounts_under(self.root)]
        for a in self.before.get("aliases", []):
            left += [f"mount {m}" for m in mounts_under(a)]
        left += [f"loop {d}" for d in loops_under(self.root)]
        left += [f"netns {n}" for n in set(netns_list()) - set(self.before.get("netns", []))]
        if link_exists(BRIDGE) and not self.before.get("bridge"):
            left.append(f"link {BRIDGE}")
        for cmd, key in (("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")):
            now = iptables_rules(cmd)
            for table, lines in now.items():
                extra = set(lines) - set(self.before.get(key, {}).get(table, []))
                left += [f"{cmd} {table}: {x}" for x in sorted(extra)]
        left += [f"cgroup {c}" for c in set(kubepods_cgroups()) - set(self.before.get("cgroups", []))]
        for p, existed in self.before.get("paths", {}).items():
            if not existed and os.path.lexists(p):
                left.append(f"path {p}")
        return left


def restore_iptables(cmd: str, before: dict[str, list[str]]) -> list[str]:
    """Delete the rules and chains added since ``before`` (kubelet's KUBE-* chains)."""
    if shutil.which(cmd) is None:
        return []
    problems = []
    now = iptables_rules(f"{cmd}-save")
    for table, lines in now.items():
        old = set(before.get(table, []))
        for line in lines:
            if line.startswith("-A ") and line not in old:
                p = run([cmd, "-w", "-t", table, "-D", *shlex.split(line[3:])], check=False)
                if p.returncode != 0:
                    problems.append(f"{cmd} -t {table} -D {line[3:]}: {p.stderr.strip()}")
        for line in lines:
            if line.startswith(":") and line not in old:
                chain = line[1:].split()[0]
                if any(o.startswith(f":{chain} ") for o in old):
                    continue
                run([cmd, "-w", "-t", table, "-F", chain], check=False)
                p = run([cmd, "-w", "-t", table, "-X", chain], check=False)
                if p.returncode != 0:
                    problems.append(f"{cmd} -t {table} -X {chain}: {p.stderr.strip()}")
    return problems


def new_root() -> str:
    return tempfile.mkdtemp(prefix="elv-k8s-", dir="/tmp")


@contextlib.contextmanager
def cluster(images: dict[str, dict[str, Any]] | None = None) -> Iterator[Cluster]:
    c = Cluster(new_root(), images=image_set(images))
    try:
        c.up()
        yield c
    finally:
        left = c.down()
        if left:
            raise ClusterError("left behind:\n  " + "\n  ".join(left))


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def main(argv: list[str]) -> int:
    """scripts/k8s-cluster: up | down ROOT | leftovers ROOT."""
    if not argv or argv[0] not in ("up", "down", "leftovers"):
        print("usage: k8s-cluster up | down [ROOT] | leftovers ROOT", file=sys.stderr)
        return 2
    if argv[0] == "up":
        c = Cluster(new_root())
        try:
            c.up()
        except Exception:
            left = c.down()
            if left:
                print("left behind: " + ", ".join(left), file=sys.stderr)
            raise
        print(f"export KUBECONFIG={c.kubeconfig}")
        print(f"# root: {c.root}; logs in {c.p('logs')}; tear down with: scripts/k8s-cluster down {c.root}")
        return 0
    roots = argv[1:] or sorted(
        os.path.join("/tmp", d)
        for d in os.listdir("/tmp")
        if d.startswith("elv-k8s-") and os.path.exists(os.path.join("/tmp", d, "state.json"))
    )
    rc = 0
    for root in roots:
        c = Cluster.load(root)
        left = c.down() if argv[0] == "down" else c.leftovers()
        for x in left:
            print(f"{root}: {x}")
        rc |= bool(left)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
