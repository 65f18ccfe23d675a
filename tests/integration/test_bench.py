"""``elv bench`` end to end on one short section: its exit status says whether
every target held, and a target it did not measure is UNMEASURED with the
reason, never left out (the verdict logic itself: tests/unit/bench)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO


def bench(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, object]]]:
    r = subprocess.run(
        [sys.executable, "-m", "csi", "bench", "--quick", "--sections", "overhead", "--out", str(out), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        cwd=REPO,
        timeout=600,
        check=False,
    )
    with open(out / "results.json") as f:
        targets = {t["key"]: t for t in json.load(f)["targets"]}
    return r, targets


def test_targets_it_did_not_measure_make_it_fail_unless_allowed(tmp_path: Path) -> None:
    r, targets = bench(tmp_path / "a", "--k8s-figures", str(tmp_path / "none.json"))
    assert r.returncode == 1, r.stdout + r.stderr
    life = targets.pop("life_vs_raw")
    assert life["status"] in ("met", "missed") and isinstance(life["value"], float)
    assert "ELV" in str(life["detail"]) and "raw" in str(life["detail"])
    assert targets, "every other target is still reported"
    for t in targets.values():
        assert t["status"] == "UNMEASURED" and "not selected (--sections)" in str(t["reason"]), t
        assert f"UNMEASURED {t['what']}" in " ".join(r.stdout.split())
    assert "kubernetes (information, no target): UNMEASURED" in r.stdout
    # The last line is one JSON object with every verdict.
    last = json.loads(r.stdout.splitlines()[-1])
    assert {t["key"] for t in last["targets"]} == {*targets, "life_vs_raw"}

    r, _ = bench(tmp_path / "b", "--allow-miss")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--allow-miss: exit 0 although not every target was met" in r.stdout
