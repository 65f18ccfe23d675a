"""elv bench's verdicts: met, missed, or UNMEASURED with a reason, and the
exit code they make (no root, no driver: the results are plain dicts)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from csi.bench import main as bench
from csi.bench.figures import GOALS, figures
from csi.bench.verdict import MET, MISSED, UNMEASURED, Figure, Goal, exit_code, judge, judge_all, outcome, ratio

LOWER = Goal("x", "lower is better", 1.10)
HIGHER = Goal("y", "higher is better", 0.90, higher_is_better=True)


@pytest.mark.parametrize(
    ("goal", "value", "status"),
    [
        (LOWER, 1.0, MET),
        (LOWER, 1.10, MET),  # the bound itself meets the target
        (LOWER, 1.1001, MISSED),
        (HIGHER, 0.90, MET),
        (HIGHER, 0.8999, MISSED),
        (HIGHER, 5.0, MET),
    ],
)
def test_a_value_meets_or_misses_its_bound(goal: Goal, value: float, status: str) -> None:
    assert judge(goal, Figure(value)).status == status


@pytest.mark.parametrize("value", [None, math.nan, math.inf, -math.inf])
def test_no_finite_value_is_unmeasured_never_met(value: float | None) -> None:
    v = judge(HIGHER, Figure(value, "fio is not installed"))
    assert v.status == UNMEASURED
    assert v.value is None
    assert v.reason == "fio is not installed"


def test_a_missing_figure_is_unmeasured_with_a_reason() -> None:
    v = judge(Goal("z", "z", 1.0, section="peer"), None)
    assert v.status == UNMEASURED and "peer" in v.reason


def test_unmeasured_without_a_reason_still_says_so() -> None:
    assert judge(LOWER, Figure(None)).reason


def test_exit_code_is_zero_only_when_every_target_is_met() -> None:
    met = judge(LOWER, Figure(1.0))
    missed = judge(LOWER, Figure(2.0))
    unmeasured = judge(LOWER, Figure(None, "no peer"))
    assert exit_code([met, met]) == 0
    assert exit_code([met, missed]) == 1
    assert exit_code([met, unmeasured]) == 1
    assert exit_code([]) == 0
    # --allow-miss is for exploration: exit 0, the verdicts unchanged.
    assert exit_code([missed, unmeasured], allow_miss=True) == 0
    o = outcome([met, missed, unmeasured])
    assert (o.met, o.missed, o.unmeasured, o.failing) == (1, 1, 1, ["x", "x"])


def test_ratio_against_nothing_is_no_ratio() -> None:
    assert ratio(2.0, 4.0) == 0.5
    assert ratio(None, 4.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def _results(**over: Any) -> dict[str, Any]:
    """A full run's results, as the sections write them (figures made up)."""
    fio = {"volume": {"iops": 95.0, "bw_bytes": 1}, "pool_fs": {"iops": 100.0, "bw_bytes": 1}, "iops_ratio": 0.95}
    peer_kind = {
        "elv": {"per_second": 20.0},
        "hostpath": {"per_second": 10.0},
        "life_sequence_ratio": 0.5,
        "throughput_ratio": 2.0,
        "latency_ratio_p50": {},
    }
    level = {
        "create_p99": 0.01,
        "rss_bytes": 50 * 2**20,
        "restart_to_ready_s": 0.3,
        "list_s": 0.01,
        "capacity_s": 0.001,
    }
    res: dict[str, Any] = {
        "overhead": {"ratio": 0.9, "elv_s": 0.09, "raw_s": 0.1, "lives": 10},
        "throughput": {"16": {"per_second": 100.0, "p99": 0.1}, "raw": {"per_second": 50.0, "clients": 16}},
        "scale": {
            "idle_rss_bytes": 40 * 2**20,
            "bare_rss_bytes": 30 * 2**20,
            "restart_0_s": 0.25,
            "10": dict(level),
            "1000": dict(level),
            "10000": dict(level, create_p99=0.012, rss_bytes=60 * 2**20),
        },
        "datapath": {job: dict(fio) for job in ("randread-4k", "randwrite-4k", "read-1m", "write-1m")},
        "peer": {"mount": peer_kind, "block": peer_kind},
    }
    res.update(over)
    return res


def test_every_target_of_a_full_run_is_judged() -> None:
    verdicts = judge_all(GOALS, figures(_results()))
    assert {v.status for v in verdicts} == {MET}, [(v.goal.key, v.status, v.reason) for v in verdicts]
    by_key = {v.goal.key: v.value for v in verdicts}
    assert by_key["throughput_vs_raw"] == pytest.approx(2.0)
    assert by_key["scale_p99"] == pytest.approx(1.2)
    assert by_key["restart_1000"] == pytest.approx(1.2)
    assert by_key["idle_rss"] == pytest.approx(40 / 30)
    assert by_key["rss_10000"] == pytest.approx(1.5)
    assert exit_code(verdicts) == 0


def test_quick_levels_leave_the_10000_targets_unmeasured_not_dropped() -> None:
    res = _results()
    del res["scale"]["10000"]
    verdicts = {v.goal.key: v for v in judge_all(GOALS, figures(res))}
    for key in ("scale_p99", "rss_10000"):
        assert verdicts[key].status == UNMEASURED
        assert "1,000" in verdicts[key].reason
    assert verdicts["restart_1000"].status == MET
    assert exit_code(verdicts.values()) == 1


@pytest.mark.parametrize(
    ("section", "state", "reason"),
    [
        ("peer", {"unmeasured": "no peer binary at /x: scripts/peer-tools builds it"}, "no peer binary"),
        ("datapath", {"error": "RuntimeError: fio failed"}, "the section failed: RuntimeError: fio failed"),
        ("overhead", None, "did not run"),
    ],
)
def test_a_section_that_did_not_run_makes_each_of_its_targets_unmeasured(
    section: str, state: dict[str, str] | None, reason: str
) -> None:
    res = _results()
    if state is None:
        del res[section]
    else:
        res[section] = state
    verdicts = judge_all(GOALS, figures(res))
    mine = [v for v in verdicts if v.goal.section == section]
    assert mine, section
    assert all(v.status == UNMEASURED and reason in v.reason for v in mine)
    assert all(v.status == MET for v in verdicts if v.goal.section != section)
    assert exit_code(verdicts) == 1


def test_a_slow_figure_is_missed() -> None:
    res = _results(overhead={"ratio": 1.3, "elv_s": 0.13, "raw_s": 0.1, "lives": 10})
    (v,) = [v for v in judge_all(GOALS, figures(res)) if v.goal.key == "life_vs_raw"]
    assert v.status == MISSED and v.value == pytest.approx(1.3)
    assert "130.0 ms" in v.detail  # the absolute figures go with the ratio


def test_fio_jobs_are_judged_one_by_one() -> None:
    res = _results()
    res["datapath"]["randwrite-4k"] = dict(res["datapath"]["randwrite-4k"], iops_ratio=0.56)
    del res["datapath"]["read-1m"]
    verdicts = {v.goal.key: v.status for v in judge_all(GOALS, figures(res))}
    assert verdicts["fio_randwrite-4k"] == MISSED
    assert verdicts["fio_read-1m"] == UNMEASURED
    assert verdicts["fio_randread-4k"] == MET


def test_the_table_prints_every_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    res = _results(machine={"cpus": 2, "kernel": "6.18", "load": [1.0, 1.0, 1.0]}, version="0")
    res["peer"] = {"unmeasured": "no peer binary at /nowhere"}
    res["k8s"] = {"unmeasured": "no ci-out/k8s-scale.json"}
    verdicts = bench.print_table(res)
    out = capsys.readouterr().out
    assert len(verdicts) == len(GOALS)
    assert out.count("UNMEASURED") == 5  # four peer targets and the kubernetes figure
    assert "no peer binary at /nowhere" in out
    assert "4 unmeasured" in out


def test_k8s_figures_are_read_when_present(tmp_path: Path) -> None:
    path = tmp_path / "k8s-scale.json"
    assert "unmeasured" in bench.k8s_figures(str(path))
    path.write_text("{not json")
    assert "unreadable" in bench.k8s_figures(str(path))["unmeasured"]
    path.write_text(json.dumps({"p50_s": 10.0, "p99_s": 20.0}))
    assert bench.k8s_figures(str(path))["figures"] == {"p50_s": 10.0, "p99_s": 20.0}


def test_unknown_sections_are_refused() -> None:
    args = argparse.Namespace(quick=True, sections="latency,nonsense", scale_levels=None)
    with pytest.raises(SystemExit, match="nonsense"):
        asyncio.run(bench.run(args))
