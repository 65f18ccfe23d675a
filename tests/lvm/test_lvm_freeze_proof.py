"""Freezes that are proven, on LVM thick and thin: snapshots, group
snapshots and clones of mounted volumes under a writer's load restore a
state that existed (tests/support/invariant.py), while raw copies of the same
devices under the same load are torn.

A thick snapshot is a copy-on-write snapshot, a thin one a thin snapshot; a
restore or a clone of a thick volume is a block copy (from a temporary
snapshot when the source is in use), of a thin one a thin snapshot. LVM
freezes the filesystem while it suspends the origin; a group freezes every
member first (csi/backend/lvm/snapshots.py)."""

from __future__ import annotations

import pytest

from csi.model import DEVICE_CLASS
from tests.support import freeze_proof as fp
from tests.support.lvm import GuestVg, LvmDriver

PROOFS = {"snapshot": fp.prove_snapshots, "group": fp.prove_groups, "clone": fp.prove_clones}


@pytest.mark.parametrize("cls", ["thick", "thin"])
@pytest.mark.parametrize("kind", sorted(PROOFS))
def test_point_in_time_under_load(driver: LvmDriver, vg: GuestVg, base: str, kind: str, cls: str) -> None:
    setup = fp.Setup(driver, "ext4", {DEVICE_CLASS: cls}, fp.staged_device, f"lvm {cls}, ext4")
    PROOFS[kind](setup, base).check(f"lvm-freeze-proof-{kind}-{cls}.txt")
