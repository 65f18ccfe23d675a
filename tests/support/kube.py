"""What the test cluster is made of, apart from its nodes and control plane:
running commands, waiting, certificates, a small API client, manifests, the
test images, and readers of host state (processes, loop devices, cgroups,
sysctls). Used by tests/support/cluster.py and tests/support/k8snode.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from tests.support.paths import REPO

TOOLS = os.environ.get("ELV_TOOLS", os.path.expanduser("~/.cache/elv-tools"))
BIN = os.path.join(TOOLS, "bin")
#: containerd v2, its runc shim, ctr and runc 1.3+ (scripts/k8s-tools containerd2),
#: under their upstream names: first on a node's PATH, containerd finds the shim
#: there and the shim finds runc.
CONTAINERD2_BIN = os.path.join(TOOLS, "containerd2", "bin")
CONTAINERD2_TOOLS = ("containerd", "containerd-shim-runc-v2", "ctr", "runc")
#: The PATH every process of a cluster starts with.
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DRIVER = "elv.csi.dev"
#: The test pod images, made here from Debian's busybox-static.
BUSYBOX = "elv.test/busybox:1.35"
PAUSE = "elv.test/pause:3.10"


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


def static_busybox() -> bool:
    # No `file` needed: a static ELF has no PT_INTERP program header.
    try:
        with open("/bin/busybox", "rb") as f:
            data = f.read(1 << 16)
    except OSError:
        return False
    return data[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in data and b"/lib/ld-linux" not in data


# ---------------------------------------------------------------- images


def tar_image(path: str, images: dict[str, dict[str, Any]]) -> None:
    """A docker-archive tarball: one busybox layer, several tagged configs."""

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


def dump_all(objs: list[dict[str, Any]]) -> str:
    return "\n---\n".join(yaml.safe_dump(o) for o in objs)


# ---------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    pid: int
    log: str


def pid_alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def kill_group(pid: int, timeout: float) -> None:
    """SIGTERM the process (and its process group), then SIGKILL after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not pid_alive(pid):
                return
            time.sleep(0.05)


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


# ---------------------------------------------------------------- host state


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def read_sysctl(name: str) -> str | None:
    try:
        with open(f"/proc/sys/{name}") as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_hierarchies() -> list[str]:
    """The mounted cgroup hierarchies (v1 controllers, and the unified one)."""
    base = "/sys/fs/cgroup"
    with contextlib.suppress(FileNotFoundError):
        return [
            os.path.join(base, c)
            for c in sorted(os.listdir(base))
            if os.path.isdir(os.path.join(base, c)) and not os.path.islink(os.path.join(base, c))
        ]
    return []


def mountinfo(pid: int | str = "self") -> list[tuple[str, str, str]]:
    """(mount point, filesystem type, source) of every mount ``pid`` sees."""
    out = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, source = right.split()[:2]
            out.append((left.split()[4].replace("\\040", " "), fstype, source))
    return out


def mounts_under(root: str, pid: int | str = "self") -> list[str]:
    real = os.path.realpath(root) if pid == "self" else root
    return [mp for mp, _, _ in mountinfo(pid) if mp == real or mp.startswith(real.rstrip("/") + "/")]


def loop_devices() -> list[dict[str, Any]]:
    """Every attached loop device: name, backing file (as the kernel shows it)
    and the device and inode of the backing file, from losetup."""
    p = run(["losetup", "--json", "--list", "-O", "NAME,BACK-FILE,BACK-MAJ:MIN,BACK-INO"], check=False)
    if p.returncode != 0 or not p.stdout.strip():
        return []
    return list(json.loads(p.stdout).get("loopdevices") or [])


def dev_of(path: str) -> str:
    """ "major:minor" of the device ``path`` (a block device node) is."""
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
