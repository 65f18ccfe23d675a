"""Per-volume serialisation with join-on-retry.

Every mutating RPC runs through :meth:`Gate.run` under the keys it touches
(a volume ID, a snapshot ID, a source volume being copied; a create, whose
object has no ID until it is made, takes its name: :func:`name_key`):

* the same request arriving again while the first is still running *joins*
  it: it waits for the same result instead of redoing the work. CSI callers
  retry after their deadline (csi-provisioner's default is 15 s, kubelet's
  2 min) while a copy or mkfs may still be going;
* a *different* request on a busy key fails fast with ABORTED, which the CSI
  spec reserves for "an operation is pending for this volume" and which
  callers retry;
* the work runs in its own task, shielded from the caller's cancellation, so
  a deadline never leaves an operation half-done.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf.message import Message

from csi.errors import Aborted

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Op:
    what: str
    fingerprint: bytes
    task: asyncio.Task[Any]
    keys: tuple[str, ...] = field(default=())


class Gate:
    def __init__(self) -> None:
        self._busy: dict[str, _Op] = {}

    def in_flight(self) -> int:
        return len({id(op) for op in self._busy.values()})

    async def run(
        self,
        what: str,
        keys: Sequence[str],
        fingerprint: bytes,
        work: Callable[[], Awaitable[T]],
    ) -> T:
        keys = tuple(dict.fromkeys(k for k in keys if k))
        primary = self._busy.get(keys[0]) if keys else None
        if primary is not None and primary.fingerprint == fingerprint and primary.keys == keys:
            log.debug("joining in-flight %s on %s", what, keys[0])
            result: T = await asyncio.shield(primary.task)
            return result
        for k in keys:
            op = self._busy.get(k)
            if op is not None:
                raise Aborted(f"an operation ({op.what}) is already in progress for {k}; retry later")

        async def runner() -> T:
            return await work()

        task: asyncio.Task[T] = asyncio.ensure_future(runner())
        op = _Op(what, fingerprint, task, keys)
        for k in keys:
            self._busy[k] = op

        def _done(t: asyncio.Task[Any]) -> None:
            for k in keys:
                if self._busy.get(k) is op:
                    del self._busy[k]
            if not t.cancelled() and t.exception() is not None:
                pass  # retrieved here so an abandoned task never warns; the caller logs it

        task.add_done_callback(_done)
        return await asyncio.shield(task)

    async def rpc(self, request: Message, keys: Sequence[str], work: Callable[[], Awaitable[T]]) -> T:
        """:meth:`run` for an RPC: named after it, and the same request again
        (secrets aside, see :func:`fingerprint`) joins the one in flight."""
        return await self.run(type(request).__name__.removesuffix("Request"), keys, fingerprint(request), work)


def name_key(kind: str, name: str) -> str:
    """The key a create takes: the object's name, since a new object gets a
    new ID only once it is made (csi.model.ids). Two creates of one name then
    never overlap, and a retry joins the first. No ID has this form."""
    return f"{kind} named {name!r}"


def fingerprint(request: Message) -> bytes:
    """Identity of a request for joining retries; secrets are left out."""
    msg = request.__class__()
    msg.CopyFrom(request)
    if msg.DESCRIPTOR.fields_by_name.get("secrets") is not None:
        msg.ClearField("secrets")
    data: bytes = msg.SerializeToString(deterministic=True)
    return hashlib.sha256(data).digest()
