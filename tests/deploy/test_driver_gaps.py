"""Node-only expansion, which a multi-node Kubernetes deployment needs.

external-resizer has no per-node mode: in ELV's DaemonSet every node's
csi-resizer would act on every PVC of elv.csi.dev and call
ControllerExpandVolume on its own node's driver, which answers NOT_FOUND for
another node's volume (infeasible, for the resizer). So the DaemonSet runs
``elv serve --node-expansion-only``: EXPAND_VOLUME is not a controller
capability, csi-resizer falls back to its trivial resizer (it only records
the new size, with leader election), and kubelet calls NodeExpandVolume on
the one node that holds the volume, which grows the backing file and then
the filesystem.
"""

from __future__ import annotations

import os
import subprocess

import yaml

from tests.support.paths import REPO


def test_serve_offers_node_only_expansion() -> None:
    p = subprocess.run(
        [os.path.join(REPO, ".venv", "bin", "python"), "-m", "csi", "serve", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=REPO,
    )
    assert p.returncode == 0, p.stderr
    assert "--node-expansion-only" in p.stdout


def test_daemonset_uses_node_only_expansion_and_one_resizer() -> None:
    with open(os.path.join(REPO, "deploy", "base", "daemonset.yaml")) as f:
        ds = next(d for d in yaml.safe_load_all(f) if d and d.get("kind") == "DaemonSet")
    containers = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
    assert "--node-expansion-only" in containers["elv"]["args"]
    assert "--leader-election" in containers["csi-resizer"]["args"]
