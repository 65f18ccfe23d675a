"""``make run``'s demo: its table and nothing else on the terminal; the driver's
log goes to a file whose path it prints, and whose tail it shows on failure."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import pytest

from csi.cmd import demo
from tests.support.paths import REPO


def test_the_demo_prints_only_its_table_and_where_the_log_is() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "csi", "demo"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        cwd=REPO,
        timeout=300,
        check=False,
    )
    lines = r.stdout.splitlines()
    log = lines[-1].removeprefix("the driver's log: ")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stderr == "", "nothing but the table: no log lines on the terminal"
        assert lines[0].startswith("ELV demo: driver elv.csi.dev ")
        steps = [ln for ln in lines if re.match(r"^ +\d+\. ", ln)]
        assert len(steps) == 15 and all(ln.endswith(" ms") for ln in steps)
        assert re.match(r"^ELV demo: done in [\d.]+ s; left behind: nothing$", lines[-2])
        assert not [ln for ln in lines if "level=" in ln or "logger=" in ln]
        assert os.path.isabs(log) and log.endswith(".log")
        with open(log) as f:
            text = f.read()
        assert "rpc=CreateVolume code=OK" in text and 'msg="serving CSI"' in text
    finally:
        if os.path.isabs(log) and os.path.isfile(log):
            os.unlink(log)


def test_a_failed_step_shows_the_tail_of_the_log(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fails(self: demo.Demo) -> None:
        await self.c.wait_ready()
        raise RuntimeError("step 3 broke")

    monkeypatch.setattr(demo.Demo, "run", fails)
    assert asyncio.run(demo.main(None, "/var/lib/kubelet", None)) == 1
    out, err = capsys.readouterr()
    m = re.search(r"the driver's log \((/\S+\.log)\) ends with:\n", err)
    assert m is not None, err
    try:
        assert err.startswith("demo failed: step 3 broke\n")
        assert 'msg="serving CSI"' in err[m.end() :], "the tail is the driver's own log"
        assert "level=" not in out
    finally:
        os.unlink(m.group(1))
