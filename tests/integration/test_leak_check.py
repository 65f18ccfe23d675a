"""The leak check every root-layer test gets (tests/support/fixtures.py,
``_nothing_left``) can fail: a mount, a loop device, a loop device stacked on
one, and a process a test leaves in its scratch directory each fail that test,
although the scratch directory's forced cleanup removes the mount and the
loop devices afterwards. Each case runs in a pytest of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.paths import REPO

INNER = """
import os, subprocess
from tests.support.driver import scratch

def test_clean():
    with scratch() as base:
        os.makedirs(os.path.join(base, "d"))

def test_mount():
    with scratch() as base:
        os.makedirs(os.path.join(base, "m"))
        subprocess.run(["mount", "-t", "tmpfs", "leak", os.path.join(base, "m")], check=True)

def test_loop():
    with scratch() as base:
        img = os.path.join(base, "img")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        subprocess.run(["losetup", "-f", img], check=True)

def test_view():
    with scratch() as base:
        img = os.path.join(base, "img")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        dev = subprocess.run(["losetup", "-f", "--show", img], check=True, capture_output=True, text=True).stdout
        subprocess.run(["losetup", "-f", "-r", dev.strip()], check=True)

def test_process():
    with scratch() as base:
        p = subprocess.Popen(["sleep", "60"], cwd=base)
        with open(os.environ["PIDFILE"], "w") as f:
            f.write(str(p.pid))
"""


@pytest.mark.parametrize(
    ("case", "leak"),
    [("clean", None), ("mount", "mount "), ("loop", "loop /dev/loop"), ("view", "(a view)"), ("process", "sleep 60")],
)
def test_the_leak_check_fails_a_test_that_leaks(tmp_path: Path, case: str, leak: str | None) -> None:
    (tmp_path / "conftest.py").write_text(
        "from tests.support.fixtures import _nothing_left\n__all__ = ['_nothing_left']\n"
    )
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    pidfile = tmp_path / "pid"
    env = dict(os.environ, PYTHONPATH=REPO, PIDFILE=str(pidfile))
    try:
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", f"test_{case}", str(tmp_path)],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(tmp_path),
            timeout=120,
        )
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    if leak is None:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "1 passed" in r.stdout
    else:
        assert r.returncode == 1, r.stdout + r.stderr
        assert "the test left behind" in r.stdout and leak in r.stdout, r.stdout
