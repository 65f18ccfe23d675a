"""The reliability suite's fuzz test (tests/support/fuzz.py) on real
LVM: malformed values in every field of every RPC never give INTERNAL or
UNKNOWN, and a rejected call changes no LV (name, size, attributes, tags) and
no mount. Fewer examples per RPC than on loop (a state read is an ``lvs``, a
second of emulated CPU): ELV_LVM_FUZZ_EXAMPLES changes them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from csi.host import scratch
from csi.model import DEVICE_CLASS as CLASS
from tests.support import observe
from tests.support.fuzz import CALLS, Fuzzed, fuzz_rpc, mounts_and_loops, seed, undo
from tests.support.lvm import GuestVg, LvmDriver, class_config, lvs, ours, wait_for, write_config

EXAMPLES = int(os.environ.get("ELV_LVM_FUZZ_EXAMPLES", "8"))


@pytest.fixture(scope="module")
def lvm_fuzz_driver(vg: GuestVg) -> Iterator[Fuzzed]:
    base = scratch.make("lvmfuzz")
    cfg = write_config(os.path.join(base, "lvm.toml"), class_config(vg))
    d = LvmDriver(base, ["--lvm-config", cfg], "--max-volumes-per-node", "3").start()

    def state() -> object:
        rows = sorted((r["lv_name"], r["lv_size"], r["lv_attr"], r["lv_tags"]) for r in lvs(vg.name))
        return (rows, mounts_and_loops(d))

    # The seed is thin: deleting a thin snapshot in a zeroing pool needs no wipe.
    known = seed(d, **{CLASS: "thin"})
    known += ["v-thick-" + "0" * 32, "v-thin-" + "f" * 32, "s-thin-" + "1" * 32, "v-thick-../x"]
    fz = Fuzzed(d, known, state, EXAMPLES)
    try:
        yield fz
    finally:
        print(fz.summary("lvm fuzz test", "lvm-fuzz-summary.txt"))
        try:
            undo(d, known[0])
            wait_for(lambda: not ours(vg), 300, "the wiper to remove every LV of ELV's")
        finally:
            rc = d.stop()
            # This driver outlives its tests (the per-test check skips it): check it here.
            left = observe.leftovers(base) + observe.processes_using(base)
            scratch.remove(base)
        assert rc == 0, d.log()[-3000:]
        assert not left, f"the fuzz test left behind: {left}"


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("service", "method"), CALLS, ids=[f"{s}.{m}" for s, m in CALLS])
def test_lvm_fuzz_rpc(lvm_fuzz_driver: Fuzzed, service: str, method: str) -> None:
    fuzz_rpc(lvm_fuzz_driver, service, method)
