"""csi-sanity v5.5.0 against ``elv serve --backend lvm``: a thick and a thin
device class, each in the mount and the block access type.

Each run must end with 0 failed and 0 skipped specs (the one pending spec is
an XIt in csi-test itself). Summaries go to ci-out/sanity-lvm-<run>.summary.json.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.driver import leftovers, scratch
from tests.support.lvm import GuestVg, LvmDriver, MiB, ours, wait_for, write_config
from tests.support.sanity import OUT, read_report, require_sanity, sanity_argv

RUNS = {
    # name: (device class, access type)
    "thick-mount": ("thick", "mount"),
    "thick-block": ("thick", "block"),
    "thin-mount": ("thin", "mount"),
    "thin-block": ("thin", "block"),
}


def _config(vg: GuestVg, cls: str) -> str:
    pool = f'thin-pool = "{vg.pool}"\n' if cls == "thin" else ""
    return f"""
default-class = "{cls}"
udev = "off"
monitoring = false
freeze-dir = "/run/elv-test-freeze-{vg.name}"

[[device-class]]
name = "{cls}"
vg = "{vg.name}"
{pool}"""


@pytest.mark.conformance
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("run", list(RUNS))
def test_csi_sanity_lvm(run: str, vg: GuestVg) -> None:
    require_sanity()
    cls, access = RUNS[run]
    os.makedirs(OUT, exist_ok=True)
    report = os.path.join(OUT, f"sanity-lvm-{run}.json")
    with scratch() as base:
        cfg = write_config(os.path.join(base, "lvm.toml"), _config(vg, cls))
        driver = LvmDriver(base, ["--lvm-config", cfg], "--max-volumes-per-node", "4").start()
        wiped = True
        try:
            params = write_config(os.path.join(base, "params.yaml"), f'"elv.csi.dev/device-class": "{cls}"\n')
            argv = sanity_argv(
                driver, access, 64 * MiB, 128 * MiB, f"sanity-lvm-{run}", ["-csi.testvolumeparameters", params]
            )
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=1700, cwd=base, check=False)
            # Deleted thick volumes are wiped in the background; let that finish.
            try:
                wait_for(lambda: not ours(vg), 300, "the wiper to remove every deleted LV")
            except TimeoutError:
                wiped = False
        finally:
            rc = driver.stop()
            left = leftovers(base)
            log = driver.log()
            with open(os.path.join(OUT, f"sanity-lvm-{run}.driver.log"), "w") as f:
                f.write(log)
    states, lines, seconds = read_report(report)
    summary = {
        "run": f"lvm-{run}",
        **{k: states.get(k, 0) for k in ("passed", "failed", "skipped", "pending")},
        "seconds": round(seconds, 1),
        "not_passed": lines,
    }
    with open(os.path.join(OUT, f"sanity-lvm-{run}.summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"csi-sanity lvm {run}: {summary}")
    assert proc.returncode == 0 and states.get("failed", 0) == 0, "\n".join(lines) + "\n" + proc.stdout[-6000:]
    assert not lines, "every spec must pass; skipped or failed:\n" + "\n".join(lines)
    assert states["passed"] >= 95
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log, log[-5000:]
    assert wiped, f"the wiper left {ours(vg)}"
    assert left == [], f"csi-sanity run left {left}"
    assert ours(vg) == [], f"csi-sanity run left LVs {ours(vg)}"
