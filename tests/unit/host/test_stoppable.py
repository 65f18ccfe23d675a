"""run_stoppable: a cancelled caller stops its worker thread, and waits for it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from csi.host.stoppable import Stopped, run_stoppable


async def test_cancel_stops_the_thread_before_the_caller_goes_on() -> None:
    steps: list[int] = []
    ended = threading.Event()

    def work(stop: threading.Event) -> int:
        try:
            for i in range(10_000):
                if stop.is_set():
                    raise Stopped(f"stopped after {i} steps")
                steps.append(i)
                time.sleep(0.01)
            return len(steps)
        finally:
            ended.set()

    task = asyncio.ensure_future(run_stoppable(work))
    while len(steps) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The caller's cleanup runs only once the thread has returned: it no longer writes.
    assert ended.is_set()
    n = len(steps)
    await asyncio.sleep(0.05)
    assert len(steps) == n


async def test_the_result_and_errors_pass_through() -> None:
    assert await run_stoppable(lambda stop: 42) == 42

    def fails(stop: threading.Event) -> None:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        await run_stoppable(fails)
