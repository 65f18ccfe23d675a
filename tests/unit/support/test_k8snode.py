"""The cluster test's node (tests/support/k8snode.py) without a cluster: which
node runs containerd v2, the configs each containerd gets, and how it is started."""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import containerd2_node
from tests.support.k8snode import CNI_DIR, Node
from tests.support.kube import CONTAINERD2_BIN, HOST_PATH, PAUSE


def node(root: Path, containerd2: bool) -> Node:
    n = Node(str(root), 3, "elv-n3", "10.204.7.13", "10.204.7.1", "abcd1234", holder=4242, containerd2=containerd2)
    os.makedirs(n.p("cni"))
    os.makedirs(n.p("containerd"))
    return n


def config(n: Node) -> dict[str, Any]:
    with open(n.containerd_config(), "rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize(("nodes", "which"), [(1, 1), (2, 2), (3, 3), (5, 3)])
def test_the_third_node_or_the_last_runs_containerd2(nodes: int, which: int) -> None:
    assert containerd2_node(nodes) == which


def test_containerd2_gets_a_version_4_config_with_the_split_cri_plugins(tmp_path: Path) -> None:
    n = node(tmp_path, True)
    c = config(n)
    assert c["version"] == 4
    assert c["root"] == n.p("containerd", "root") and c["state"] == "/run/containerd-state"
    assert c["imports"] == [], "the host's /etc/containerd/conf.d must not be read"
    assert {"io.containerd.internal.v1.opt", "io.containerd.nri.v1.nri"} <= set(c["disabled_plugins"])
    assert "grpc" not in c and "ttrpc" not in c, "version 3's server sections: deprecated in 4"
    p = c["plugins"]
    assert p["io.containerd.server.v1.grpc"] == {"address": n.containerd_sock}
    assert p["io.containerd.server.v1.ttrpc"] == {"address": f"{n.containerd_sock}.ttrpc"}
    assert p["io.containerd.cri.v1.images"]["pinned_images"] == {"sandbox": PAUSE}
    rt = p["io.containerd.cri.v1.runtime"]
    assert rt["cni"] == {"bin_dirs": [CNI_DIR], "conf_dir": n.p("cni"), "max_conf_num": 1}
    runc = rt["containerd"]["runtimes"]["runc"]
    assert rt["containerd"]["default_runtime_name"] == "runc"
    # No BinaryName: the shim finds runc on the PATH containerd_env gives.
    assert runc == {"runtime_type": "io.containerd.runc.v2", "options": {"SystemdCgroup": False}}
    assert p["io.containerd.grpc.v1.cri"] == {"stream_server_address": "127.0.0.1", "stream_server_port": "10010"}
    # 1.6's CRI keys would be ignored by 2.x (or migrated): none of them here.
    assert "sandbox_image" not in str(c)


def test_debian_containerd_keeps_its_version_2_config(tmp_path: Path) -> None:
    c = config(node(tmp_path, False))
    assert c["version"] == 2
    cri = c["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == PAUSE and cri["cni"]["bin_dir"] == CNI_DIR
    assert "io.containerd.cri.v1.runtime" not in c["plugins"]


def test_containerd2_runs_from_the_cache_with_it_first_on_path(tmp_path: Path) -> None:
    n = node(tmp_path, True)
    argv = n.containerd_argv()
    assert argv[: argv.index("--") + 1] == ["nsenter", "--target=4242", "--mount", "--net", "--"]
    assert argv[argv.index("--") + 1 :] == [
        os.path.join(CONTAINERD2_BIN, "containerd"),
        "--config",
        n.p("containerd", "config.toml"),
    ]
    assert n.containerd_env() == {"PATH": f"{CONTAINERD2_BIN}:{HOST_PATH}"}
    assert n.ctr("images", "ls")[0] == os.path.join(CONTAINERD2_BIN, "ctr")


def test_debian_containerd_runs_from_path(tmp_path: Path) -> None:
    n = node(tmp_path, False)
    assert n.containerd_argv()[-3:] == ["containerd", "--config", n.p("containerd", "config.toml")]
    assert n.containerd_env() == {}
    assert n.ctr("images", "ls")[0] == "ctr"


def test_the_flag_survives_the_state_file(tmp_path: Path) -> None:
    n = node(tmp_path, True)
    assert Node(**asdict(n)).containerd2 is True
    # A state file from before the flag: a Debian node.
    old = asdict(n)
    del old["containerd2"]
    assert Node(**old).containerd2 is False
