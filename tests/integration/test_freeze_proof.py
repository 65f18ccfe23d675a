"""Freezes that are proven, on the loop backend: snapshots, group snapshots
and clones of mounted volumes under a writer's load restore a state that
existed (tests/support/invariant.py has the load and the invariant), while
raw copies of the same images under the same load are torn."""

from __future__ import annotations

import pytest

from tests.support import freeze_proof as fp
from tests.support.driver import Driver, leftovers
from tests.support.wrappers import unmount_pool, xfs_pool

PROOFS = {"snapshot": fp.prove_snapshots, "group": fp.prove_groups, "clone": fp.prove_clones}


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
@pytest.mark.parametrize("kind", sorted(PROOFS))
def test_point_in_time_under_load(driver: Driver, base: str, kind: str, fs: str) -> None:
    setup = fp.Setup(driver, fs, {}, fp.loop_image(driver), f"loop, {fs}")
    PROOFS[kind](setup, base).check(f"freeze-proof-{kind}-{fs}.txt")


@pytest.mark.parametrize("kind", ["snapshot", "clone"])
def test_raw_block_on_a_reflink_pool_is_one_instant(base: str, kind: str) -> None:
    """A raw block volume has no filesystem to freeze: its snapshots and
    clones are one instant only on a pool that copies by reflink (xfs here),
    as README's Known limits says."""
    xfs_pool(base, 1024)
    d = Driver(base).start()
    try:
        fp.prove_raw_block(d, base, kind, "loop on an xfs pool").check(f"freeze-proof-raw-block-{kind}.txt")
    finally:
        assert d.stop() == 0
        unmount_pool(base)
    assert leftovers(base) == []
