"""scripts/test with CI set refuses a run that would leave a part of the suite
out, before it runs or deletes anything (issue 15, item 14)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.paths import REPO


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "ELV_SKIP_VM", "ELV_CRASH_KILLS")}
    return subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "test"), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


@pytest.mark.parametrize(
    ("args", "env", "why"),
    [
        (["-k", "sanity"], {"CI": "1"}, "pytest arguments were given (-k sanity)"),
        ([], {"CI": "true", "ELV_SKIP_VM": "1"}, "ELV_SKIP_VM=1 would leave the LVM layer out"),
        ([], {"CI": "1", "ELV_CRASH_KILLS": "20"}, "ELV_CRASH_KILLS=20 is not a whole number of at least 200"),
        ([], {"CI": "1", "ELV_CRASH_KILLS": "many"}, "ELV_CRASH_KILLS=many is not a whole number of at least 200"),
    ],
)
def test_ci_refuses_a_partial_run(args: list[str], env: dict[str, str], why: str) -> None:
    r = run(args, **env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert why in r.stderr
    assert r.stdout == "", "the run began before it was refused"


def test_every_refusal_is_named() -> None:
    r = run(["-x"], CI="1", ELV_SKIP_VM="1", ELV_CRASH_KILLS="3")
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 3, r.stderr
