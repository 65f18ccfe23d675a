"""A focused subset of the Kubernetes storage e2e suite against the test cluster.

Opt-in (ELV_E2E=1): e2e.test v1.36.5 (scripts/k8s-tools e2e) runs the External
Storage specs for elv.csi.dev described by deploy/test-driver.yaml, limited to
the provisioning, volumes, volumeMode, volume-expand, snapshottable and
capacity suites; slow, serial, disruptive and feature-gated specs (SELinux,
VolumeAttributesClass, group snapshots) are left out. The test pods stay on
the first node (pinned_driver: ClientNodeName, and a taint on the others). The counts go to
ci-out/k8s-e2e.json and into ci-out/k8s-summary.json.

The specs that pass, and those that fail, must be exactly those listed in
tests/k8s/e2e-expected.txt ("pass: NAME", "fail: NAME", each failure with the
reason it is known): a spec that stops passing (it fails, or now skips
itself) is as much a finding as a new failure, and a known failure that
starts to pass is reported too, so the list is kept true on purpose. Each
run writes what passed to ci-out/k8s-e2e-passed.txt.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter

import pytest

from tests.support.cluster import BIN, ELSEWHERE_TAINT, PAUSE, REPO, Cluster
from tests.support.k8s import Summary

E2E = os.path.join(BIN, "e2e.test")
FOCUS = r"External.Storage \[Driver: elv\.csi\.dev\].*\] (provisioning|volumes|volumeMode|volume-expand|snapshottable|capacity) "
# "Pre-provisioned Snapshot": with distributed snapshotting (csi-snapshotter
# --node-deployment) a hand-made VolumeSnapshotContent is handled only if it
# carries snapshot.storage.kubernetes.io/managed-by=<node>, which these specs
# don't set, so they wait out their 5 minutes (external-snapshotter v8.6.0,
# cmd/csi-snapshotter/main.go).
# "should not mount / map unused volumes": it inspects the node through a
# hostexec pod that runs `nsenter --mount=/proc/1/ns/mnt`: PID 1 of the
# machine, not of the node's namespaces (and this CI sandbox refuses access to
# PID 1's namespaces even to privileged root), so it can only fail here.
SKIP = (
    r"\[Disruptive\]|\[Slow\]|\[Serial\]|Feature:SELinux|Feature:Windows|VolumeAttributesClass"
    r"|volumegroupsnapshot|stress|Pre-provisioned Snapshot|should not mount / map unused volumes"
)
EXPECTED = os.path.join(os.path.dirname(__file__), "e2e-expected.txt")
AGNHOST = 'if [ "$1" = pause ]; then exec sleep 2147483647; fi; echo "agnhost stand-in: $* is not offered" >&2; exit 1'
# The e2e images these specs run, made from the same busybox layer (nothing is pulled).
E2E_IMAGES = {
    "registry.k8s.io/e2e-test-images/busybox:1.37.0-1": {"Cmd": ["sh"]},
    "registry.k8s.io/e2e-test-images/busybox:1.36.1-1": {"Cmd": ["sh"]},
    "registry.k8s.io/pause:3.10.2": {"Entrypoint": ["/bin/sleep", "2147483647"]},
    # volumes' exec test runs its own shell script in the nginx image.
    "registry.k8s.io/e2e-test-images/nginx:1.15-4": {"Cmd": ["sh"]},
    # agnhost: only its "pause" subcommand (NewAgnhostContainer's default) is offered.
    "registry.k8s.io/e2e-test-images/agnhost:2.66.1": {"Entrypoint": ["/bin/sh", "-c", AGNHOST, "agnhost"]},
}


@pytest.mark.e2e
@pytest.mark.timeout(3600)
def test_storage_e2e_subset(cluster: Cluster, summary: Summary) -> None:
    if not os.access(E2E, os.X_OK):
        pytest.fail(f"{E2E} is missing: build it with scripts/k8s-tools e2e", pytrace=False)
    assert PAUSE
    cluster.import_images(E2E_IMAGES)
    # volumeMode specs look into /var/lib/kubelet/pods on the node, hard-coded:
    # in each node's mount namespace that is the node's own kubelet directory.
    out = os.path.join(REPO, "ci-out")
    os.makedirs(out, exist_ok=True)
    report = os.path.join(out, "k8s-e2e.json")
    argv = [
        E2E,
        f"-kubeconfig={cluster.kubeconfig}",
        "-provider=local",
        f"-storage.testdriver={pinned_driver(cluster, out)}",
        f"-ginkgo.focus={FOCUS}",
        f"-ginkgo.skip={SKIP}",
        "-ginkgo.no-color",
        "-ginkgo.timeout=55m",
        f"-ginkgo.json-report={report}",
        f"-ginkgo.junit-report={os.path.join(out, 'k8s-e2e.xml')}",
        f"-report-dir={out}",
        # The other nodes' taint (pods_only_on) must not make e2e.test wait for them.
        f"-non-blocking-taints=node-role.kubernetes.io/control-plane,{ELSEWHERE_TAINT}",
    ]
    t = time.monotonic()
    log = os.path.join(out, "k8s-e2e.log")
    with open(log, "w") as f, cluster.pods_only_on(cluster.nodes[0].name):
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=3500, check=False, cwd=cluster.root)
    wall = round(time.monotonic() - t, 1)
    with open(report) as f:
        specs = json.load(f)[0]["SpecReports"]
    # A spec left out by focus/skip is "skipped" without a message; one that
    # skipped itself at run time (the driver lacks what it needs) has one.
    its = [s for s in specs if s.get("LeafNodeType") == "It"]
    states = Counter(s["State"] for s in its)
    bad = ("failed", "timedout", "panicked", "aborted", "interrupted")
    counts = {
        "passed": states.get("passed", 0),
        "failed": sum(states.get(k, 0) for k in bad),
        "skipped": sum(1 for s in its if s["State"] == "skipped" and (s.get("Failure") or {}).get("Message")),
        "wall_s": wall,
    }
    failed = sorted(spec_name(s) for s in its if s.get("State") in bad)
    passed = sorted(spec_name(s) for s in its if s.get("State") == "passed")
    with open(os.path.join(out, "k8s-e2e-passed.txt"), "w") as f:
        f.writelines(f"{name}\n" for name in passed)
    expected = expected_specs()
    missing = sorted(expected["pass"] - set(passed))
    extra = sorted(set(passed) - expected["pass"])
    new_failures = sorted(set(failed) - expected["fail"])
    fixed = sorted(expected["fail"] - set(failed))
    summary.data["e2e"] = {
        **counts,
        "failed_specs": failed,
        "known_failures": sorted(expected["fail"] & set(failed)),
        "missing_specs": missing,
        "unexpected_passes": extra,
    }
    print(f"\ne2e subset: {counts} (log {log})")
    for f_ in failed:
        print(f"  FAILED{' (known)' if f_ in expected['fail'] else ''} {f_}")
    for m in missing:
        print(f"  EXPECTED TO PASS, DID NOT: {m}")
    for x in extra:
        print(f"  PASSED, NOT LISTED IN {EXPECTED}: {x}")
    for x in fixed:
        print(f"  KNOWN FAILURE DID NOT FAIL: {x}")
    assert counts["passed"] > 0, f"no e2e spec passed (rc {proc.returncode}); see {log}"
    assert not new_failures, f"{len(new_failures)} e2e specs failed that are not known failures; see {log}"
    assert not missing and not extra and not fixed, (
        f"the results are not exactly {EXPECTED}: {len(missing)} expected passes missing, {len(extra)} unlisted "
        f"passes, {len(fixed)} known failures that did not fail (ci-out/k8s-e2e-passed.txt lists what passed)"
    )


def pinned_driver(cluster: Cluster, out: str) -> str:
    """deploy/test-driver.yaml with the test pods on the cluster's first node.

    ELV's volumes are local: a volume restored from a snapshot, or cloned,
    can only be made on the node that holds its source. Spreading over nodes
    is tests/k8s/test_cluster.py's job; here the specs test the CSI
    behaviour, on one node, as csi-driver-host-path runs them.

    ClientNodeName reaches only the pods the suite places through its node
    selection. Some specs make pods without any: "restoring snapshot to
    larger size pvc" creates the restored claim's pod bare, while its first
    pod still runs on the snapshot's node. The scheduler takes the
    best-scoring feasible node, and NodeResourcesFit scores that busier node
    lower (a BestEffort pod counts as 100m CPU and 200 MiB there), so it
    tried only the two idle nodes, where ELV answers RESOURCE_EXHAUSTED
    (reschedule), for the spec's whole 5 minutes (2026-12-05). So the run
    also keeps every other node tainted (Cluster.pods_only_on)."""
    with open(os.path.join(REPO, "deploy", "test-driver.yaml"), encoding="utf-8") as f:
        text = f.read()
    path = os.path.join(out, "k8s-e2e-test-driver.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{text.rstrip()}\nClientNodeName: {cluster.nodes[0].name}\n")
    return path


def spec_name(spec: dict[str, object]) -> str:
    texts = spec.get("ContainerHierarchyTexts") or []
    assert isinstance(texts, list)
    return " ".join([*map(str, texts), str(spec.get("LeafNodeText", ""))])


def expected_specs() -> dict[str, set[str]]:
    """EXPECTED's "pass: NAME" and "fail: NAME" lines; # starts a comment line."""
    out: dict[str, set[str]] = {"pass": set(), "fail": set()}
    with open(EXPECTED, encoding="utf-8") as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            kind, _, name = line.rstrip("\n").partition(": ")
            assert kind in out and name, f"{EXPECTED}: not 'pass: NAME' or 'fail: NAME': {line!r}"
            assert name not in out["pass"] | out["fail"], f"{EXPECTED} lists {name!r} twice"
            out[kind].add(name)
    assert out["pass"], f"{EXPECTED} lists no spec that passes"
    return out
