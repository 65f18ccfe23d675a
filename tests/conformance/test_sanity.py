"""The real csi-sanity (kubernetes-csi/csi-test v5.5.0) against ``elv serve``.

Built by scripts/tools into ~/.cache/elv-tools (or $ELV_TOOLS). The staging
and mount directories lie beneath the driver's --kubelet-dir, as the driver
requires of every path. Each run must end with 0 failed and 0 skipped specs;
the one "pending" spec is disabled upstream (an XIt in csi-test itself).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.driver import Driver, leftovers, scratch
from tests.support.sanity import OUT, read_report, require_sanity, sanity_argv, yaml_map

MiB = 1024 * 1024

RUNS = {
    # name: (access type, test volume parameters, volume size, expand size, extra driver flags)
    "mount-ext4": ("mount", {}, 64 * MiB, 128 * MiB, ()),
    "mount-xfs": ("mount", {"csi.storage.k8s.io/fstype": "xfs"}, 300 * MiB, 400 * MiB, ()),
    "block": ("block", {}, 64 * MiB, 128 * MiB, ()),
    # As the Kubernetes DaemonSet runs it: volumes grow in NodeExpandVolume.
    "mount-xfs-node-expansion": (
        "mount",
        {"csi.storage.k8s.io/fstype": "xfs"},
        300 * MiB,
        400 * MiB,
        ("--node-expansion-only",),
    ),
}


#: Specs a run may skip, with the reason. The ControllerExpandVolume specs test a
#: capability that node-only expansion deliberately does not offer.
ALLOWED_SKIPS = {
    "mount-xfs-node-expansion": (
        "should fail if no volume id is given",
        "should fail if no capacity range is given",
        "should work",
    ),
}


@pytest.mark.conformance
@pytest.mark.root
@pytest.mark.timeout(900)
@pytest.mark.parametrize("run", list(RUNS))
def test_csi_sanity(run: str) -> None:
    if os.geteuid() != 0:
        pytest.fail("csi-sanity needs root (it stages and mounts volumes)", pytrace=False)
    require_sanity()
    access, params, size, expand, flags = RUNS[run]
    os.makedirs(OUT, exist_ok=True)
    report = os.path.join(OUT, f"sanity-{run}.json")
    with scratch() as base:
        driver = Driver(base, "--max-volumes-per-node", "4", *flags).start()
        try:
            mutable = yaml_map(os.path.join(base, "mutable.yaml"), {"elv.csi.dev/provisioning": "thick"})
            argv = sanity_argv(
                driver, access, size, expand, f"sanity-{run}", ["-csi.testvolumemutableparameters", mutable]
            )
            if params:
                argv += ["-csi.testvolumeparameters", yaml_map(os.path.join(base, "params.yaml"), params)]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=840, cwd=base, check=False)
        finally:
            rc = driver.stop()
        left = leftovers(base)
        pool_files = sorted(os.listdir(os.path.join(driver.pool, "volumes"))) + sorted(
            os.listdir(os.path.join(driver.pool, "snapshots"))
        )
    states, lines, _ = read_report(report)
    summary = {"run": run, **{k: states.get(k, 0) for k in ("passed", "failed", "skipped", "pending")}}
    with open(os.path.join(OUT, f"sanity-{run}.summary.json"), "w") as f:
        json.dump(summary, f)
    print(f"csi-sanity {run}: {summary}")
    assert proc.returncode == 0 and states.get("failed", 0) == 0, "\n".join(lines) + "\n" + proc.stdout[-4000:]
    allowed = {f"skipped:  :: {t}" for t in ALLOWED_SKIPS.get(run, ())}
    assert [x for x in lines if x not in allowed] == [], "every spec must pass; skipped or failed:\n" + "\n".join(lines)
    assert states["passed"] >= 95 - len(allowed)
    assert rc == 0
    assert left == [], f"csi-sanity run left {left}"
    assert pool_files == [], f"csi-sanity run left pool files {pool_files}"
