"""One node of the test cluster: a mount namespace and a network namespace
of its own, held open by a sleeping process, with its own containerd,
kubelet, kubelet root directory, ELV pool and cgroup root.

Inside the node's mount namespace (made from the host's, then changed only
there):

    /run          a fresh tmpfs (containerd's shim sockets, runc state, the
                  pods' network namespaces, the DaemonSet's /run/elv)
    /var/lib      NODE/var-lib (kubelet's /var/lib/kubelet, CNI state, and
                  /var/lib/elv: the node's ELV pool, a small xfs filesystem
                  on a loop device of its own, so capacity is per node and small)
    /var/log      NODE/var-log (/var/log/pods, /var/log/containers)

so the DaemonSet's hostPaths (/var/lib/kubelet, /var/lib/elv, /run/elv,
/dev) mean on each node what they mean on a real one, and nothing the node
does shows on the host: no mount, no network namespace file, no log. The
node's /var/lib/kubelet is an rshared bind mount (the driver's Bidirectional
mounts propagate to kubelet and to the pods).

Network: the node's end of a veth pair (eth0, NODE_IP/24) on the cluster's
test bridge, whose host end holds the API server's address. No default
route: nothing leaves the test network. Pods get a bridge of their own
inside the node's namespace; the node masquerades them to its own address,
and sends what they address to the `kubernetes` Service to the API server
(there is no kube-proxy), so in-cluster clients work.

Paths of the node seen from the host: ``/proc/HOLDER/root/PATH``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from tests.support.kube import (
    CONTAINERD2_BIN,
    HOST_PATH,
    PAUSE,
    ClusterError,
    cgroup_hierarchies,
    dev_of,
    kill_group,
    link_exists,
    loop_devices,
    mountinfo,
    pid_alive,
    pids_with,
    run,
    wait_for,
)

CNI_DIR = "/usr/lib/cni"
#: The size of each node's ELV pool (a sparse file; xfs).
POOL_SIZE = 4 * 1024**3
#: The address kubelet gives pods for the `kubernetes` Service (the first of
#: the API server's --service-cluster-ip-range).
SERVICE_RANGE = "10.203.78.0/24"
SERVICE_IP = "10.203.78.1"
#: The trees each node has of its own (see the module's docstring).
PRIVATE = ("/run", "/var/lib", "/var/log")
PRIVATE_PREFIXES = tuple(f"{d}/" for d in PRIVATE)


@dataclass
class Node:
    root: str  # the cluster's scratch root
    index: int  # 1..N
    name: str
    ip: str  # on the test bridge
    gateway: str  # the bridge's address: the API server's
    tag: str  # unique to this cluster: names its veths and cgroups
    holder: int = 0  # the process that holds the namespaces open
    netns_ino: int = 0
    mntns_ino: int = 0
    pool_loop: str = ""  # the loop device of the pool filesystem
    pool_dev: str = ""  # its major:minor
    api_port: int = 0  # the API server's, for the node's route to the `kubernetes` Service
    containerd2: bool = False  # runs containerd v2 and runc 1.3+ from CONTAINERD2_BIN (user namespaces)

    # -- paths

    @property
    def dir(self) -> str:
        return os.path.join(self.root, "nodes", self.name)

    def p(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def kubelet_dir(self) -> str:
        """/var/lib/kubelet of the node, as a host path (the files; not its mounts)."""
        return self.p("var-lib", "kubelet")

    @property
    def pool_image(self) -> str:
        return self.p("pool.img")

    @property
    def containerd_sock(self) -> str:
        return self.p("containerd", "containerd.sock")

    @property
    def csi_socket(self) -> str:
        return os.path.join(self.kubelet_dir, "plugins", "elv.csi.dev", "csi.sock")

    @property
    def cgroup(self) -> str:
        """kubelet's cgroupRoot: its pods' cgroups go beneath it."""
        return f"elv-{self.tag}-{self.name}"

    @property
    def veth(self) -> str:
        return f"elv{self.tag}{self.index}"

    @property
    def pod_subnet(self) -> str:
        return f"10.244.{self.index}.0/24"

    def view(self, path: str) -> str:
        """A path inside the node (its mounts included), as the host can read it."""
        return f"/proc/{self.holder}/root{path}"

    def ns(self, *argv: str) -> list[str]:
        """argv run inside the node's mount and network namespaces."""
        return ["nsenter", f"--target={self.holder}", "--mount", "--net", "--", *argv]

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    # -- bring-up

    def holder_argv(self) -> list[str]:
        """A process in new mount and network namespaces that only sleeps.
        Mount propagation from the host is cut (private), so nothing mounted
        inside shows outside, and the other way round."""
        return ["unshare", "--mount", "--net", "--propagation", "private", "sleep", "2147483647"]

    def adopt(self, holder: int) -> None:
        self.holder = holder

        def entered() -> bool:
            # unshare(2) has run once the namespaces differ from ours.
            return os.stat(f"/proc/{holder}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino

        wait_for(f"{self.name}'s namespaces", entered, 10, 0.02)
        self.netns_ino = os.stat(f"/proc/{holder}/ns/net").st_ino
        self.mntns_ino = os.stat(f"/proc/{holder}/ns/mnt").st_ino

    def network(self, bridge: str) -> None:
        run(["ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", str(self.holder)])
        run(["ip", "link", "set", self.veth, "master", bridge, "up"])
        for argv in (
            ["ip", "addr", "add", f"{self.ip}/24", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "link", "set", "lo", "up"],
            ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
            # What pods send to the `kubernetes` Service goes to the API
            # server (kube-proxy's one job that the test needs) ...
            [
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                SERVICE_IP,
                "-p",
                "tcp",
                "--dport",
                "443",
                "-j",
                "DNAT",
                "--to-destination",
                f"{self.gateway}:{self.api_port}",
            ],
            # ... from the node's own address.
            [
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                self.pod_subnet,
                "-o",
                "eth0",
                "-j",
                "MASQUERADE",
            ],
        ):
            run(self.ns(*argv))

    def mounts(self) -> None:
        for d in ("var-lib/kubelet", "var-lib/elv", "var-log", "containerd", "cni", "cni-ipam"):
            os.makedirs(self.p(d), exist_ok=True)
        # The namespace starts as a copy of the host's mounts, other tests' and
        # clusters' among them. Kept, a copy would pin their filesystems (their
        # loop devices could not be detached while this node lives), and one at
        # /var/lib/kubelet, stacked under ours, is what containerd finds for that
        # path ("not a shared mount"). So the copies under /tmp and in the
        # node's own trees go, here only.
        copied = [m for m, _, _ in mountinfo(self.holder) if m in PRIVATE or m.startswith((*PRIVATE_PREFIXES, "/tmp/"))]
        for m in sorted(copied, key=len, reverse=True):
            run(self.ns("umount", "-l", m), check=False)
        steps = [
            ["mount", "-t", "tmpfs", "-o", "mode=0755,size=256m", "elv-node-run", "/run"],
            ["mount", "--bind", self.p("var-lib"), "/var/lib"],
            ["mount", "--bind", self.p("var-log"), "/var/log"],
            ["mount", "--bind", "/var/lib/kubelet", "/var/lib/kubelet"],
            ["mount", "--make-rshared", "/var/lib/kubelet"],
            ["mount", "-t", "xfs", "-o", "nouuid", self.pool_loop, "/var/lib/elv"],
        ]
        for argv in steps:
            run(self.ns(*argv))

    def make_pool(self) -> None:
        """The node's disk for ELV: a sparse file with xfs, attached here (the
        mount is made inside the node by mounts())."""
        os.makedirs(self.dir, exist_ok=True)
        with open(self.pool_image, "wb") as f:
            f.truncate(POOL_SIZE)
        run(["mkfs.xfs", "-q", "-m", "reflink=1", self.pool_image])
        self.pool_loop = run(["losetup", "--find", "--show", "--direct-io=on", self.pool_image]).stdout.strip()
        self.pool_dev = dev_of(self.pool_loop)

    def cgroups(self) -> None:
        """kubelet's cgroupRoot in every hierarchy (kubelet wants it to exist).
        cpuset children start empty: give it its parent's CPUs and memory nodes."""
        for h in cgroup_hierarchies():
            d = os.path.join(h, self.cgroup)
            os.makedirs(d, exist_ok=True)
            for f in ("cpuset.cpus", "cpuset.mems"):
                if os.path.exists(os.path.join(h, f)):
                    with open(os.path.join(h, f)) as src, open(os.path.join(d, f), "w") as dst:
                        dst.write(src.read().strip())

    def containerd_config(self) -> str:
        cni = self.p("cni")
        conf = {
            "cniVersion": "0.4.0",
            "name": "elv-pods",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    # The pods' default route: to the node, which forwards
                    # the `kubernetes` Service to the API server.
                    "isDefaultGateway": True,
                    "ipMasq": False,
                    "hairpinMode": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.pod_subnet}]],
                        "dataDir": self.p("cni-ipam"),
                    },
                },
                {"type": "loopback"},
            ],
        }
        with open(os.path.join(cni, "10-elv.conflist"), "w") as f:
            json.dump(conf, f, indent=1)
        d = self.p("containerd")
        config = self._containerd2_config(d, cni) if self.containerd2 else self._containerd16_config(d, cni)
        path = os.path.join(d, "config.toml")
        with open(path, "w") as f:
            f.write(config)
        return path

    def _containerd16_config(self, d: str, cni: str) -> str:
        """Debian's containerd 1.6: a version 2 config."""
        return f"""version = 2
root = "{d}/root"
state = "/run/containerd-state"
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
  stream_server_port = "10010"
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

    def _containerd2_config(self, d: str, cni: str) -> str:
        """containerd v2 (2.4): a version 4 config, its own current format
        (`containerd config default`), so nothing is migrated at start. The CRI
        plugin is split in three there: images (the sandbox image is pinned),
        runtime (runc, CNI) and grpc (the stream server). Plugins that would
        touch the host outside the node (opt: /opt/containerd) or that the test
        does not use are disabled, and the host's /etc/containerd/conf.d is
        not imported. The shim and runc are found on containerd's PATH
        (containerd_env)."""
        return f"""version = 4
root = "{d}/root"
state = "/run/containerd-state"
imports = []
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs", "io.containerd.differ.v1.erofs",
  "io.containerd.mount-handler.v1.erofs", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]
[debug]
  level = "warn"
[plugins."io.containerd.server.v1.grpc"]
  address = "{self.containerd_sock}"
[plugins."io.containerd.server.v1.ttrpc"]
  address = "{self.containerd_sock}.ttrpc"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE}"
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_DIR}"]
    conf_dir = "{cni}"
    max_conf_num = 1
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "10010"
"""

    def tool(self, name: str) -> str:
        """containerd's binaries for this node: v2's from the cache, or Debian's."""
        return os.path.join(CONTAINERD2_BIN, name) if self.containerd2 else name

    def containerd_argv(self) -> list[str]:
        return self.ns(self.tool("containerd"), "--config", self.containerd_config())

    def containerd_env(self) -> dict[str, str]:
        """containerd v2 finds containerd-shim-runc-v2 on its PATH, and the shim
        (which inherits it) finds runc there: the cache's come first."""
        return {"PATH": f"{CONTAINERD2_BIN}:{HOST_PATH}"} if self.containerd2 else {}

    def ctr(self, *args: str) -> list[str]:
        return [self.tool("ctr"), "-a", self.containerd_sock, "-n", "k8s.io", *args]

    def wait_containerd(self, alive: Any) -> None:
        def up() -> bool:
            alive()
            return (
                run([self.tool("ctr"), "-a", self.containerd_sock, "version"], check=False, timeout=10).returncode == 0
            )

        wait_for(f"containerd on {self.name}", up, 60, 0.2)

    def kubelet_config(self, ca: str, cert: str, key: str) -> dict[str, Any]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.ip,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": ca},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": cert,
            "tlsPrivateKeyFile": key,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroup}",
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
            "volumePluginDir": "/var/lib/kubelet/volume-plugins",
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
            "maxPods": 60,
            "protectKernelDefaults": False,
        }

    # -- what the node holds

    def processes(self) -> list[int]:
        """Every process in the node's network or mount namespace (containerd,
        kubelet, the holder, shims), and every one in its cgroups (the pods')."""
        found = set(pids_with(self.containerd_sock))
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{d}/ns/net").st_ino == self.netns_ino and self.netns_ino:
                    found.add(int(d))
                    continue
                if os.stat(f"/proc/{d}/ns/mnt").st_ino == self.mntns_ino and self.mntns_ino:
                    found.add(int(d))
        for h in cgroup_hierarchies():
            for dirpath, _, files in os.walk(os.path.join(h, self.cgroup)):
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError), open(os.path.join(dirpath, "cgroup.procs")) as f:
                        found |= {int(x) for x in f.read().split()}
        found.discard(os.getpid())
        return sorted(p for p in found if pid_alive(p))

    def volume_loops(self) -> list[str]:
        """Loop devices backed by a file on this node's pool, or by the pool image itself."""
        out = []
        for d in loop_devices():
            back = str(d.get("back-maj:min") or "").strip()
            if (self.pool_dev and back == self.pool_dev) or d.get("back-file") == self.pool_image:
                out.append(str(d["name"]))
        return out

    def cgroup_dirs(self) -> list[str]:
        return [
            os.path.join(h, self.cgroup) for h in cgroup_hierarchies() if os.path.isdir(os.path.join(h, self.cgroup))
        ]

    # -- tear-down

    def kill_all(self) -> None:
        """Every process of the node, the holder last: the namespaces then go,
        and with them every mount made inside (the pool's included)."""
        for _ in range(3):
            pids = [p for p in self.processes() if p != self.holder]
            for pid in pids:
                kill_group(pid, 2)
            if not pids:
                break
        if self.holder:
            kill_group(self.holder, 5)
        with contextlib.suppress(ClusterError):
            # A container's process may take a while to die (uninterruptible I/O).
            wait_for(f"{self.name}'s processes gone", lambda: not self.processes(), 30, 0.1)

    def release(self) -> list[str]:
        """Detach the loop devices, remove the cgroups; what could not be."""
        problems = []
        loops = self.volume_loops()
        # Volumes first: they keep the pool filesystem (and its loop) busy.
        for dev in sorted(loops, key=lambda d: d == self.pool_loop):
            for _ in range(20):
                if run(["losetup", "-d", dev], check=False).returncode == 0 or dev not in self.volume_loops():
                    break
                time.sleep(0.1)
        for d in self.cgroup_dirs():
            for _ in range(50):
                for sub, _, _ in sorted(os.walk(d), key=lambda w: len(w[0]), reverse=True):
                    with contextlib.suppress(OSError):
                        os.rmdir(sub)
                if not os.path.isdir(d):
                    break
                time.sleep(0.1)
        if link_exists(self.veth):
            run(["ip", "link", "delete", self.veth], check=False)
        problems += [f"{self.name}: loop {d}" for d in self.volume_loops()]
        return problems

    def leftovers(self) -> list[str]:
        left = [f"{self.name}: process {p} ({describe(p)})" for p in self.processes()]
        left += [f"{self.name}: loop {d}" for d in self.volume_loops()]
        left += [f"{self.name}: cgroup {d}" for d in self.cgroup_dirs()]
        if link_exists(self.veth):
            left.append(f"{self.name}: link {self.veth}")
        return left


def describe(pid: int) -> str:
    """A process's state and command line, for a report."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().split(") ")[-1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "gone"
    return f"state {state}: {cmd[:120]}"
