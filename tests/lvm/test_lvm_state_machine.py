"""The reliability suite's state machine (tests/support/machine.py)
on real LVM: random sequences of create, stage, publish, unpublish, unstage,
delete, repeats and hard and soft restarts on thick and thin volumes, checked
after every step against the model: one volume per name, none lost or leaked,
mounts as the model expects, and foreign LVs in the same VG untouched.

Fewer examples than on loop (each step costs about a second of LVM commands
in the emulated guest): ELV_LVM_SM_EXAMPLES and ELV_LVM_SM_STEPS change them.
"""

from __future__ import annotations

import os

import pytest

from csi.model import DEVICE_CLASS as CLASS
from tests.support.driver import Driver, MiB
from tests.support.lvm import GuestVg, LvmDriver, class_config, lv, lvm, ours, wait_for, write_config
from tests.support.machine import DriverMachine, run_machine

EXAMPLES = int(os.environ.get("ELV_LVM_SM_EXAMPLES", "4"))
STEPS = int(os.environ.get("ELV_LVM_SM_STEPS", "20"))
# Two LVs that are not ELV's: one plain, one with the name ELV would give a volume.
FOREIGN = ("admin-sm", "elv-v-thick-" + "e" * 32)


def remove_foreign(vg: GuestVg, check: bool = True) -> None:
    lvm("lvremove", "-q", "-y", *(f"{vg.name}/{n}" for n in FOREIGN), check=check)


class LvmMachine(DriverMachine):
    vg: GuestVg  # set by the test: a machine is made by hypothesis, not by a fixture

    def start_driver(self) -> Driver:
        cfg = write_config(os.path.join(self.base, "lvm.toml"), class_config(self.vg))
        d = LvmDriver(self.base, ["--lvm-config", cfg])
        d.fork = True  # every start and restart forks a pre-imported interpreter
        return d.start()

    def parameters(self, name: str) -> dict[str, str]:
        return {CLASS: "thin" if name in ("beta", "delta") else "thick"}

    def make_foreign(self) -> None:
        remove_foreign(self.vg, check=False)  # a failed example's teardown may not have got this far
        for name in FOREIGN:
            lvm("lvcreate", "-q", "-y", "-n", name, "-L", "8m", self.vg.name)

    def foreign_intact(self) -> None:
        for name in FOREIGN:
            row = lv(self.vg.name, name)
            assert row is not None and int(row["lv_size"]) == 8 * MiB and row["lv_tags"] == "", (
                f"foreign LV {name} was touched: {row}"
            )

    def remove_foreign(self) -> None:
        remove_foreign(self.vg)


@pytest.mark.timeout(600 + 60 * EXAMPLES * STEPS)
def test_lvm_state_machine(base: str, vg: GuestVg) -> None:
    LvmMachine.vg = vg
    try:
        run_machine(LvmMachine, EXAMPLES, STEPS)
    finally:
        remove_foreign(vg, check=False)
        # A deleted thick volume is wiped in the background: a driver stopped
        # before its wipe ended leaves it to the next one, so start one.
        d = LvmDriver(base, ["--lvm-config", write_config(os.path.join(base, "lvm.toml"), class_config(vg))])
        d.start()
        try:
            wait_for(lambda: not ours(vg), 300, "the wiper to remove every LV of ELV's")
        finally:
            assert d.stop() == 0, d.log()[-3000:]
