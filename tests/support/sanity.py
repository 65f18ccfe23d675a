"""Running the real csi-sanity (kubernetes-csi/csi-test v5.5.0), and reading
its report. Built by scripts/tools into ~/.cache/elv-tools (or $ELV_TOOLS).

The staging and mount directories lie beneath the driver's --kubelet-dir, as
the driver requires of every path. tests/conformance runs it on the loop
backend, tests/lvm on each device class.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence

import pytest

from tests.support.driver import Driver
from tests.support.paths import REPO

TOOLS = os.environ.get("ELV_TOOLS", os.path.expanduser("~/.cache/elv-tools"))
SANITY = os.path.join(TOOLS, "bin", "csi-sanity")
#: Reports and summaries, where scripts/test and scripts/lvm-vm print them from.
OUT = os.path.join(REPO, "ci-out")


def require_sanity() -> None:
    """Fail (never skip) without the binary: a skipped conformance run must never pass as green."""
    if not os.access(SANITY, os.X_OK):
        pytest.fail(f"{SANITY} is missing: build it with scripts/tools", pytrace=False)


def sanity_argv(driver: Driver, access: str, size: int, expand: int, name: str, extra: Sequence[str] = ()) -> list[str]:
    """csi-sanity against ``driver``, writing ci-out/NAME.json (ginkgo's report) and NAME.xml."""
    argv = [SANITY, "-csi.endpoint", driver.endpoint]
    argv += ["-csi.stagingdir", os.path.join(driver.kubelet, "sanity-staging")]
    argv += ["-csi.mountdir", os.path.join(driver.kubelet, "sanity-mount")]
    argv += ["-csi.testvolumeaccesstype", access, "-csi.testvolumesize", str(size)]
    argv += ["-csi.testvolumeexpandsize", str(expand), *extra, "-csi.testnodevolumeattachlimit"]
    argv += ["-ginkgo.json-report", os.path.join(OUT, f"{name}.json")]
    return [*argv, "-ginkgo.junit-report", os.path.join(OUT, f"{name}.xml"), "-ginkgo.no-color"]


def read_report(report: str) -> tuple[Counter[str], list[str], float]:
    """csi-sanity's ginkgo JSON report: the count of each spec state, a line
    for every spec that neither passed nor is pending, and the run time (s)."""
    with open(report) as f:
        specs = json.load(f)[0]["SpecReports"]
    its = [s for s in specs if s.get("LeafNodeType") == "It"]
    states = Counter(s["State"] for s in its)
    lines = [
        f"{s['State']}: {' / '.join(s['ContainerHierarchyTexts'][1:])} :: {s['LeafNodeText']}"
        for s in its
        if s["State"] not in ("passed", "pending")
    ]
    return states, lines, sum(s.get("RunTime", 0) for s in specs) / 1e9


def yaml_map(path: str, m: dict[str, str]) -> str:
    """A flat YAML map file (csi-sanity's -csi.testvolume*parameters)."""
    with open(path, "w") as f:
        for k, v in m.items():
            f.write(f"{json.dumps(k)}: {json.dumps(v)}\n")
    return path
