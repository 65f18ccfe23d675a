"""Blocking loops (block copies, zeroing) in a worker thread that stop when
their caller is cancelled.

``asyncio.to_thread`` cannot stop a thread: a cancelled copy went on writing,
and the interpreter's exit then waited for it (it joins every worker thread),
so a driver told to stop could outlive its grace. Here the work gets a
``threading.Event`` to test between steps; on cancellation it is set, and the
caller waits for the thread to return before its own cleanup runs, so that
cleanup never races writes still in flight.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Stopped(Exception):
    """Raised by a step loop that saw its stop event (its caller was cancelled)."""


async def run_stoppable(work: Callable[[threading.Event], T]) -> T:
    """Run ``work(stop)`` in a worker thread; on cancellation set ``stop``,
    wait for the thread to return (one step), then re-raise."""
    stop = threading.Event()
    fut = asyncio.ensure_future(asyncio.to_thread(work, stop))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait({fut})
        if not fut.cancelled():
            fut.exception()  # retrieved: the thread's Stopped is expected here
        raise
