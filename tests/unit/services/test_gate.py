from __future__ import annotations

import asyncio
import gc

import pytest

from csi.errors import Aborted
from csi.services.gate import Gate


class Work:
    """Work that waits for ``release`` and counts how often it ran."""

    def __init__(self, result: object = "done", error: BaseException | None = None) -> None:
        self.runs = 0
        self.finished = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.result = result
        self.error = error

    async def __call__(self) -> object:
        self.runs += 1
        self.started.set()
        await self.release.wait()
        self.finished += 1
        if self.error is not None:
            raise self.error
        return self.result


async def test_identical_request_joins_and_work_runs_once() -> None:
    gate = Gate()
    work = Work(result={"id": 1})
    first = asyncio.ensure_future(gate.run("CreateVolume", ["v1"], b"fp", work))
    await work.started.wait()
    second = asyncio.ensure_future(gate.run("CreateVolume", ["v1"], b"fp", work))
    await asyncio.sleep(0.01)
    assert gate.in_flight() == 1
    work.release.set()
    a, b = await asyncio.gather(first, second)
    assert a is b
    assert a == {"id": 1}
    assert work.runs == 1


async def test_different_fingerprint_on_a_busy_key_is_aborted() -> None:
    gate = Gate()
    work = Work()
    first = asyncio.ensure_future(gate.run("CreateVolume", ["v1"], b"fp-1", work))
    await work.started.wait()
    other = Work()
    with pytest.raises(Aborted, match=r"an operation \(CreateVolume\) is already in progress for v1") as ei:
        await gate.run("DeleteVolume", ["v1"], b"fp-2", other)
    assert ei.value.code.name == "ABORTED"
    assert other.runs == 0
    work.release.set()
    assert await first == "done"


async def test_key_in_a_secondary_position_conflicts() -> None:
    gate = Gate()
    clone = Work()
    # A clone of v-src holds both its own ID and the source's.
    first = asyncio.ensure_future(gate.run("CreateVolume", ["v-new", "v-src"], b"clone", clone))
    await clone.started.wait()
    delete = Work()
    with pytest.raises(Aborted, match="v-src"):
        await gate.run("DeleteVolume", ["v-src"], b"delete", delete)
    # Same fingerprint, but the busy key is not this request's primary: no join either.
    with pytest.raises(Aborted):
        await gate.run("CreateVolume", ["v-other", "v-src"], b"clone", Work())
    assert delete.runs == 0
    clone.release.set()
    await first


async def test_same_fingerprint_with_other_keys_does_not_join() -> None:
    gate = Gate()
    work = Work()
    first = asyncio.ensure_future(gate.run("CreateSnapshot", ["s1", "v1"], b"fp", work))
    await work.started.wait()
    with pytest.raises(Aborted):
        await gate.run("CreateSnapshot", ["s1", "v2"], b"fp", Work())
    work.release.set()
    await first


async def test_caller_cancellation_does_not_cancel_the_work_and_a_retry_joins() -> None:
    gate = Gate()
    work = Work(result="made")
    caller = asyncio.ensure_future(gate.run("NodeStageVolume", ["v1"], b"fp", work))
    await work.started.wait()
    caller.cancel()  # the CO's deadline passed
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(0.01)
    assert gate.in_flight() == 1, "the work was abandoned with its caller"
    retry = asyncio.ensure_future(gate.run("NodeStageVolume", ["v1"], b"fp", work))
    await asyncio.sleep(0.01)
    work.release.set()
    assert await retry == "made"
    assert work.runs == 1
    assert work.finished == 1


async def test_keys_are_released_after_success() -> None:
    gate = Gate()
    work = Work()
    work.release.set()
    assert await gate.run("A", ["k1", "k2"], b"1", work) == "done"
    assert gate.in_flight() == 0
    # A different request on the same keys now runs instead of being aborted.
    again = Work(result="second")
    again.release.set()
    assert await gate.run("B", ["k2", "k1"], b"2", again) == "second"
    assert again.runs == 1


async def test_keys_are_released_after_failure_and_the_error_propagates() -> None:
    gate = Gate()
    work = Work(error=ValueError("disk on fire"))
    work.release.set()
    with pytest.raises(ValueError, match="disk on fire"):
        await gate.run("A", ["k1"], b"1", work)
    assert gate.in_flight() == 0
    ok = Work()
    ok.release.set()
    assert await gate.run("A", ["k1"], b"2", ok) == "done"


async def test_exceptions_reach_every_joiner() -> None:
    gate = Gate()
    err = RuntimeError("mkfs failed")
    work = Work(error=err)
    callers = [asyncio.ensure_future(gate.run("Stage", ["v1"], b"fp", work)) for _ in range(3)]
    await work.started.wait()
    await asyncio.sleep(0.01)
    work.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert results == [err, err, err]
    assert work.runs == 1
    assert gate.in_flight() == 0


async def test_abandoned_failure_is_retrieved_and_released(caplog: pytest.LogCaptureFixture) -> None:
    gate = Gate()
    work = Work(error=RuntimeError("nobody listens"))
    caller = asyncio.ensure_future(gate.run("Stage", ["v1"], b"fp", work))
    await work.started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    work.release.set()
    for _ in range(50):
        if gate.in_flight() == 0:
            break
        await asyncio.sleep(0.01)
    assert gate.in_flight() == 0
    assert work.finished == 1
    del caller
    gc.collect()
    await asyncio.sleep(0)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_empty_and_duplicate_keys() -> None:
    gate = Gate()
    work = Work()
    work.release.set()
    assert await gate.run("X", ["", "k", "k", ""], b"fp", work) == "done"
    none = Work(result=7)
    none.release.set()
    assert await gate.run("Y", [], b"fp", none) == 7


async def test_in_flight_counts_operations_not_keys() -> None:
    gate = Gate()
    a, b = Work(), Work()
    ta = asyncio.ensure_future(gate.run("A", ["k1", "k2", "k3"], b"a", a))
    tb = asyncio.ensure_future(gate.run("B", ["k4"], b"b", b))
    await a.started.wait()
    await b.started.wait()
    assert gate.in_flight() == 2
    a.release.set()
    b.release.set()
    await asyncio.gather(ta, tb)
    assert gate.in_flight() == 0
