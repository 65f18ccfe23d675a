"""scripts/lvm-vm's plumbing, with a fake vng and qemu: each mode builds its
guest script and boots without an error of its own. (Its --bench mode once
died at once on an unset variable after a merge, and nothing noticed: the
real guest runs only in make test and make bench.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO

FAKE_VNG = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_VNG_ARGS"
echo "fake vng ran"
"""


def fake_repo(tmp: Path) -> Path:
    """A copy of the script in a tree of its own: its ci-out, a .venv/bin with a
    python (the real interpreter), vng and qemu (fakes), and a tools cache."""
    repo = tmp / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "scripts", "lvm-vm"), repo / "scripts" / "lvm-vm")
    (repo / "csi").mkdir()
    venv = repo / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(sys.executable)
    for name in ("vng", "qemu-system-x86_64"):
        (venv / name).write_text(FAKE_VNG)
        (venv / name).chmod(0o755)
    tools = tmp / "tools" / "bin"
    tools.mkdir(parents=True)
    (tools / "csi-sanity").write_text("#!/bin/sh\n")
    (tools / "csi-sanity").chmod(0o755)
    (tmp / "vmlinuz").write_text("")
    (tmp / "disks").mkdir()
    return repo


def run(
    tmp: Path, *args: str, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], list[str], str]:
    repo = fake_repo(tmp)
    env = {
        **(extra_env or {}),
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "ELV_TOOLS": str(tmp / "tools"),
        "ELV_VM_KERNEL": str(tmp / "vmlinuz"),
        "ELV_VM_DISK_DIR": str(tmp / "disks"),
        "FAKE_VNG_ARGS": str(tmp / "vng-args"),
    }
    r = subprocess.run(
        ["bash", str(repo / "scripts" / "lvm-vm"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    vng = (tmp / "vng-args").read_text().splitlines() if (tmp / "vng-args").exists() else []
    guest = (repo / "ci-out" / "lvm-guest.sh").read_text() if (repo / "ci-out" / "lvm-guest.sh").exists() else ""
    return r, vng, guest


@pytest.mark.parametrize(
    ("args", "in_guest", "vgs"),
    [
        (["--bench"], "csi bench --backend lvm --out ci-out/bench-lvm", []),
        (["--bench", "--quick"], "csi bench --backend lvm --out ci-out/bench-lvm --quick", []),
        (["tests/lvm/test_lvm_data.py", "-k", "x y"], "tests/lvm/test_lvm_data.py -k x\\ y", ["elvtest"]),
        ([], "ELV_LVM_CRASH_SECONDS=360", ["elvsana", "elvsanb", "elvcrash"]),
        # The LVM power-loss test runs last in stream B: a time box in CI, every point in the soak.
        ([], "ELV_TEST_VG=elvsanb ELV_LVM_POWER_SECONDS=180 ", ["elvsana", "elvsanb", "elvcrash"]),
        (["--soak"], "tests/lvm/test_latency.py", ["elvsana", "elvsanb", "elvcrash"]),
        (["--soak"], "ELV_TEST_VG=elvsanb ELV_LVM_POWER_SECONDS=0 ", ["elvsana", "elvsanb", "elvcrash"]),
    ],
)
def test_each_mode_boots_its_guest_script(tmp_path: Path, args: list[str], in_guest: str, vgs: list[str]) -> None:
    r, vng, guest = run(tmp_path, *args)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "unbound variable" not in out and "syntax error" not in out, out
    assert "fake vng ran" in r.stdout
    assert in_guest in guest
    assert vng[:2] == ["--run", str(tmp_path / "vmlinuz")] and "--disable-kvm" in vng
    ids = [w.split(",")[1].removeprefix("id=") for a in vng for w in a.split() if w.startswith("if=none,")]
    assert sorted(ids) == sorted(f"{vg}-{i}" for vg in vgs for i in (0, 1)), vng
    # The disks' directory is removed with the run.
    assert list((tmp_path / "disks").iterdir()) == []


def test_the_lvm_power_loss_box_and_seed_reach_the_guest(tmp_path: Path) -> None:
    env = {"ELV_LVM_POWER_SECONDS": "77", "ELV_LVM_POWER_SEED": "4242"}
    r, _, guest = run(tmp_path, extra_env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ELV_TEST_VG=elvsanb ELV_LVM_POWER_SECONDS=77 " in guest
    assert "ELV_LVM_POWER_SECONDS=77 ELV_LVM_POWER_SEED=4242" in guest
    b = next(line for line in guest.splitlines() if line.startswith("ELV_TEST_VG=elvsanb"))
    nxt = guest.splitlines()[guest.splitlines().index(b) + 1]
    assert "tests/lvm/test_power_loss_lvm.py" in b + nxt
