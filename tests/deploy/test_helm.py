"""deploy/helm/elv renders the objects of the kustomize overlays, object by
object: the loop overlay with the default values, the lvm overlay with
backend=lvm, and the snapshot-controller with snapshotController.enabled.
`helm lint` passes. helm v4 comes from scripts/k8s-tools (the tools cache).

One difference is allowed, by name only: the lvm ConfigMap's suffix is a
digest of its content in both, but kustomize's and the chart's digests are
computed differently (elv-lvm-<kustomize hash> against elv-lvm-<sha256>).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_manifests import TOOLS, build
from tests.support.paths import REPO

CHART = os.path.join(REPO, "deploy", "helm", "elv")
HELM = os.path.join(TOOLS, "bin", "helm")
GENERATED = re.compile(r"^elv-lvm-[a-z0-9]{10}$")


def helm(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not os.access(HELM, os.X_OK):
        pytest.fail(f"{HELM} is missing: scripts/k8s-tools helm builds it", pytrace=False)
    # helm's cache, config and data go to a scratch directory, not $HOME.
    env = {**os.environ, **{f"HELM_{k}_HOME": str(tmp / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120, check=False, env=env)


def normalized(objs: list[dict[str, Any]]) -> dict[tuple[str, str, str], Any]:
    text = yaml.safe_dump_all(objs, sort_keys=True)
    objs = list(yaml.safe_load_all(re.sub(r"elv-lvm-[a-z0-9]{10}\b", "elv-lvm-GENERATED", text)))
    out = {}
    for o in objs:
        key = (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
        assert key not in out, f"{key} twice"
        out[key] = o
    return out


def render(tmp: Path, *sets: str) -> list[dict[str, Any]]:
    argv = ["template", "elv", CHART]
    for s in sets:
        argv += ["--set", s]
    p = helm(tmp, *argv)
    assert p.returncode == 0, p.stderr
    return [d for d in yaml.safe_load_all(p.stdout) if d]


@pytest.mark.parametrize(
    ("sets", "kustomizations"),
    [
        ((), ["overlays/loop"]),
        (("backend=lvm",), ["overlays/lvm"]),
        (("snapshotController.enabled=true",), ["overlays/loop", "snapshot-controller"]),
    ],
)
def test_the_chart_renders_what_kustomize_does(
    tmp_path: Path, sets: tuple[str, ...], kustomizations: list[str]
) -> None:
    chart = normalized(render(tmp_path, *sets))
    want = normalized([o for k in kustomizations for o in build(k)])
    assert sorted(chart) == sorted(want), "different objects"
    for key, obj in want.items():
        assert chart[key] == obj, f"{key} differs"


def test_the_lvm_config_map_is_named_by_its_content(tmp_path: Path) -> None:
    (cm,) = [o for o in render(tmp_path, "backend=lvm") if o["kind"] == "ConfigMap"]
    assert GENERATED.match(cm["metadata"]["name"])
    (other,) = [o for o in render(tmp_path, "backend=lvm", "lvm.config=x") if o["kind"] == "ConfigMap"]
    assert other["metadata"]["name"] != cm["metadata"]["name"] and other["data"]["lvm.toml"].strip() == "x"
    with open(os.path.join(REPO, "deploy", "overlays", "lvm", "lvm.toml")) as f:
        assert cm["data"]["lvm.toml"] == f.read(), "the chart's lvm.toml is not the overlay's"


@pytest.mark.parametrize("sets", [(), ("backend=lvm", "snapshotController.enabled=true")])
def test_helm_lint(tmp_path: Path, sets: tuple[str, ...]) -> None:
    argv = ["lint", "--strict", CHART]
    for s in sets:
        argv += ["--set", s]
    p = helm(tmp_path, *argv)
    assert p.returncode == 0, p.stdout + p.stderr
