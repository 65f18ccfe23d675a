"""The committed bindings in csi/v1 must be exactly what scripts/gen-proto produces."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO as REPO_DIR

REPO = Path(REPO_DIR)
GEN_SCRIPT = REPO / "scripts" / "gen-proto"
GENERATED = ("csi_pb2.py", "csi_pb2_grpc.py", "csi_pb2.pyi", "csi_pb2_grpc.pyi")


def _first_diff(committed: bytes, fresh: bytes, name: str) -> str:
    diff = difflib.unified_diff(
        committed.decode("utf-8", "replace").splitlines(),
        fresh.decode("utf-8", "replace").splitlines(),
        fromfile=f"committed/{name}",
        tofile=f"regenerated/{name}",
        lineterm="",
        n=1,
    )
    return "\n".join(list(diff)[:40])


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        [str(GEN_SCRIPT), str(tmp_path)],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"gen-proto failed:\n{proc.stdout}\n{proc.stderr}"

    out_dir = tmp_path / "csi" / "v1"
    produced = sorted(p.name for p in out_dir.iterdir())
    assert produced == sorted(GENERATED), f"unexpected generator output: {produced}"

    stale = []
    for name in GENERATED:
        committed = (REPO / "csi" / "v1" / name).read_bytes()
        fresh = (out_dir / name).read_bytes()
        if committed != fresh:
            stale.append(_first_diff(committed, fresh, name))
    assert not stale, "csi/v1 is out of date with proto/csi/v1/csi.proto; run `make proto`.\n\n" + "\n\n".join(stale)
