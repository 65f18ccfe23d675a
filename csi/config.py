"""Driver configuration: built once at the edge (csi.cli) and passed down.

Nothing else in the package reads the environment.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from csi import DRIVER_NAME


class Mode(enum.Enum):
    CONTROLLER = "controller"
    NODE = "node"
    ALL = "all"

    @property
    def controller(self) -> bool:
        return self in (Mode.CONTROLLER, Mode.ALL)

    @property
    def node(self) -> bool:
        return self in (Mode.NODE, Mode.ALL)


@dataclass(frozen=True)
class Config:
    endpoint: str
    node_id: str
    backend: str = "loop"
    mode: Mode = Mode.ALL
    driver_name: str = DRIVER_NAME
    loop_dir: str = "/var/lib/elv/loop"
    kubelet_dir: str = "/var/lib/kubelet"
    #: Sparse volumes may promise this many times the pool's space (1.0 = never overcommit).
    overprovision_ratio: float = 1.0
    #: Leave expansion to NodeExpandVolume (no controller EXPAND_VOLUME), for the
    #: per-node DaemonSet: a resizer on every node would otherwise call
    #: ControllerExpandVolume on drivers that do not hold the volume.
    node_expansion_only: bool = False
    #: Reported by NodeGetInfo; 0 means no limit.
    max_volumes_per_node: int = 0
    #: Group allowed on the socket (mode 0660); None keeps it 0600.
    socket_group: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    metrics_address: str | None = None
    command_timeout: float = 120.0
    max_concurrent_rpcs: int = 256
    max_parallel_commands: int = 16
    direct_io: bool = True
    #: PATH the runner searches for external tools (a fixed, root-owned list by default).
    tool_path: str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    #: mkfs.xfs -c options=FILE, e.g. an lts_*.conf for older kernels (Debian 12's xfsprogs 6.1
    #: cannot parse its own lts files, so there is no default).
    xfs_config: str | None = None
    #: Process state that must not outlive a reboot (the running-commands journal).
    #: None means /run/elv/<hash of the endpoint>, so drivers on one host never share it.
    state_dir: str | None = None
    #: LVM backend: a device-class file, or one class from flags (see csi.backend.lvm).
    lvm_config: str | None = None
    lvm_vg: str | None = None
    lvm_thin_pool: str | None = None
    lvm_devices: str | None = None
    #: Talk to the Kubernetes API ("in-cluster": the pod's service account, or
    #: a kubeconfig path): ControllerModifyVolume of another node's volume is
    #: handed to that node's driver, and group snapshot contents are claimed
    #: for this node (see csi.kube). None: never.
    kubernetes_api: str | None = None

    @property
    def topology_key(self) -> str:
        return f"topology.{self.driver_name}/node"

    @property
    def run_dir(self) -> str:
        if self.state_dir:
            return self.state_dir
        digest = hashlib.sha256(self.endpoint.encode()).hexdigest()[:12]
        return f"/run/elv/{digest}"

    @property
    def socket_path(self) -> str:
        prefix = "unix://"
        if not self.endpoint.startswith(prefix):
            raise ValueError("the endpoint must be unix:///absolute/path")
        path = self.endpoint[len(prefix) :]
        if not path.startswith("/"):
            raise ValueError("the endpoint must be unix:///absolute/path")
        return path
