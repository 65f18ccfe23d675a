"""Fuzz every RPC with malformed values in every field (hypothesis).

Requests are generated from the message descriptors, so a new field is fuzzed
without touching this test. Two properties hold for every call:

* the answer is never INTERNAL or UNKNOWN: bad input is the caller's fault
  and gets a precise code;
* a rejected call has no side effects: the pool's files, the mounts and the
  loop devices under the test's directory are exactly as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from csi.host import scratch
from tests.support import observe
from tests.support.driver import Driver
from tests.support.fuzz import CALLS, Fuzzed, fuzz_rpc, seed, state, undo

EXAMPLES = int(os.environ.get("ELV_FUZZ_EXAMPLES", "150"))


@pytest.fixture(scope="module")
def fuzz_driver() -> Iterator[Fuzzed]:
    base = scratch.make("fuzz")
    d = Driver(base, "--max-volumes-per-node", "3").start()
    fz = Fuzzed(d, seed(d), lambda: state(d), EXAMPLES)
    try:
        yield fz
        undo(d, fz.known[0])
    finally:
        rc = d.stop()
        log = d.log()
        # This driver outlives its tests (the per-test check skips it): check it here.
        left = observe.leftovers(base) + observe.processes_using(base)
        scratch.remove(base)
    assert rc == 0, log[-3000:]
    assert not left, f"the fuzz test left behind: {left}"
    print(fz.summary("fuzz test", "fuzz-summary.txt"))


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("service", "method"), CALLS, ids=[f"{s}.{m}" for s, m in CALLS])
def test_fuzz_rpc(fuzz_driver: Fuzzed, service: str, method: str) -> None:
    fuzz_rpc(fuzz_driver, service, method)
