"""The LVM bench's pure parts: the commands per RPC read from the driver's
log, the per-case summary, and its verdicts (no root, no device-mapper)."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi.bench import lvm
from csi.bench.figures import LVM_GOALS, figures
from csi.bench.harness import MiB
from csi.bench.verdict import MET, MISSED, UNMEASURED, exit_code, judge_all

LOG = """\
ts=2026-12-05T01:00:00.000Z level=debug logger=csi.host.runner msg="exec lvm lvs --config activation{udev_sync=0} --reportformat json -- vg"
ts=2026-12-05T01:00:00.100Z level=debug logger=csi.host.runner msg="exec lvm lvcreate --config activation{udev_sync=0} -n elv-v-x vg"
ts=2026-12-05T01:00:00.200Z level=info logger=csi.backend.lvm.backend msg="created volume v-x"
"""


def test_the_tracer_reads_the_commands_of_each_rpc_from_the_log(tmp_path: Path) -> None:
    log = tmp_path / "elv.log"
    log.write_text('ts=... msg="exec lvm vgs --config x"\n')
    t = lvm.Tracer(str(log))
    t.skip()  # startup's commands are nobody's
    t.on = True
    with log.open("a") as f:
        f.write(LOG)
    t("CreateVolume")
    with log.open("a") as f:
        f.write('ts=... logger=csi.backend.lvm.shell msg="shell lvm lvs --units b -- vg"\n')
        f.write('ts=... msg="exec /sbin/mkfs.ext4 -q /dev/dm-3"\n')
    t("NodeStageVolume")
    t.on = False
    with log.open("a") as f:
        f.write('ts=... msg="exec lvm lvremove -y vg/x"\n')
    t("DeleteVolume")  # untimed: read past, not recorded
    assert t.rpcs == [
        ("CreateVolume", ["lvm lvs", "lvm lvcreate"]),
        ("NodeStageVolume", ["lvm lvs (shell)", "mkfs.ext4"]),
    ]


def test_short_names_a_command_by_program_and_lvm_subcommand() -> None:
    assert lvm.short("lvm lvchange --config a{b} -an vg/x") == "lvm lvchange"
    assert lvm.short("/usr/sbin/blkdiscard -z /dev/dm-1") == "blkdiscard"
    assert lvm.short("") == ""


def test_cow_size_matches_the_drivers_default_reserve() -> None:
    # 64 MiB origin: 64 MiB + 0.5 MiB exception table + one 4 MiB extent, in whole extents.
    assert lvm.cow_size(64 * MiB) == 72 * MiB


def test_summary_is_the_ratio_of_totals_with_each_rounds_ratio() -> None:
    rounds = [
        ({"CreateVolume": [1.0], "DeleteVolume": [0.5]}, {"CreateVolume": [0.8], "DeleteVolume": [0.5]}),
        ({"CreateVolume": [1.2], "DeleteVolume": [0.5]}, {"CreateVolume": [0.9], "DeleteVolume": [0.4]}),
    ]
    s = lvm.summarize(rounds)
    assert s["ratio"] == pytest.approx(3.2 / 2.6)
    assert s["round_ratios"] == pytest.approx([1.5 / 1.3, 1.7 / 1.3])
    assert s["steps"]["CreateVolume"]["ratio"] == pytest.approx(1.1 / 0.85)


def _case(ratio: float) -> dict[str, object]:
    return {"ratio": ratio, "round_ratios": [ratio], "elv_s": ratio, "raw_s": 1.0, "steps": {}}


def test_lvm_verdicts() -> None:
    res = {
        "backend": "lvm",
        "lvm-cases": {c: _case(1.1) for c in lvm.CASES} | {"thick": _case(1.6)},
        "lvm-fio": {"unmeasured": "fio is not installed (apt-get install fio)"},
    }
    v = {x.goal.key: x for x in judge_all(LVM_GOALS, figures(res))}
    assert v["lvm_thick"].status == MISSED
    assert v["lvm_thin"].status == MET
    assert v["lvm_fio_randread-4k"].status == UNMEASURED
    assert "fio is not installed" in v["lvm_fio_randread-4k"].reason
    assert len(v) == len(lvm.CASES) + len(lvm.FIO_JOBS)
    assert exit_code(v.values()) == 1


def test_without_device_mapper_every_lvm_target_is_unmeasured() -> None:
    res = {"backend": "lvm", "lvm-cases": {"unmeasured": "no dm"}, "lvm-fio": {"unmeasured": "no dm"}}
    assert {x.status for x in judge_all(LVM_GOALS, figures(res))} == {UNMEASURED}


def test_fio_figures_name_the_hand_made_lv_when_measured() -> None:
    job = {
        "volume_iops": 900.0,
        "hand_lv_iops": 910.0,
        "raw_disk_iops": 1000.0,
        "iops_ratio": 0.9,
        "volume_vs_hand_lv": 900 / 910,
        "hand_lv_vs_raw_disk": 0.91,
    }
    res = {"backend": "lvm", "lvm-cases": {}, "lvm-fio": {"rounds": 3, "runtime_s": 5} | {j: job for j in lvm.FIO_JOBS}}
    v = {x.goal.key: x for x in judge_all(LVM_GOALS, figures(res))}
    got = v["lvm_fio_randwrite-4k"]
    assert got.status == MISSED  # the target is the LV against the raw disk, whoever is to blame
    assert "an LV made by hand 910" in got.detail and "hand-made 0.99" in got.detail
    old = {k: job[k] for k in ("volume_iops", "raw_disk_iops", "iops_ratio")}
    res["lvm-fio"] = {j: old for j in lvm.FIO_JOBS}
    assert "by hand" not in {x.goal.key: x for x in judge_all(LVM_GOALS, figures(res))}["lvm_fio_read-1m"].detail
