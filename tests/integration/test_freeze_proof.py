"""Freezes that are proven, on the loop backend: snapshots, group snapshots
and clones of mounted volumes under a writer's load restore a state that
existed (tests/support/invariant.py has the load and the invariant), while
raw copies of the same images under the same load are torn."""

from __future__ import annotations

import pytest

from tests.support import freeze_proof as fp
from tests.support.driver import Driver

PROOFS = {"snapshot": fp.prove_snapshots, "group": fp.prove_groups, "clone": fp.prove_clones}


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
@pytest.mark.parametrize("kind", sorted(PROOFS))
def test_point_in_time_under_load(driver: Driver, base: str, kind: str, fs: str) -> None:
    setup = fp.Setup(driver, fs, {}, fp.loop_image(driver), f"loop, {fs}")
    PROOFS[kind](setup, base).check()
