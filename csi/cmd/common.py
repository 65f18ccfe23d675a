"""Shared pieces of the ``elv`` volume commands: sizes, output, errors, lookups.

Every command talks CSI to the running driver's socket, exactly as the
Kubernetes sidecars do; there are no private shortcuts.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from csi.cmd.client import Client
from csi.model import NAME_KEY, ids
from csi.v1 import csi_pb2

T = TypeVar("T")
DEFAULT_ENDPOINT = "unix:///run/elv/csi.sock"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?|[kmgtp]i?)?[Bb]?\s*$")
_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "p": 1000**5,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
    "pi": 1024**5,
}


class CliError(Exception):
    """A user-facing failure: a message and what to do about it."""

    def __init__(self, message: str, hint: str = "", status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.status = status


def parse_size(text: str) -> int:
    """'2Gi' -> 2147483648; '500M' -> 500000000; '1048576' -> 1048576."""
    m = _SIZE.match(text)
    if not m:
        raise CliError(f"cannot read size {text!r}", "use a number with an optional unit, e.g. 512Mi, 2Gi or 10G")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    return int(value)


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024  # type: ignore[assignment]
    return str(n)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    cols = [header, *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cols]
    return "\n".join(lines)


def explain(e: grpc.aio.AioRpcError, endpoint: str) -> CliError:
    code, details = e.code(), e.details() or ""
    hints = {
        grpc.StatusCode.UNAVAILABLE: f"is the driver running? start one with: elv serve --endpoint {endpoint}",
        grpc.StatusCode.NOT_FOUND: "see `elv volume list` for the volumes that exist",
        grpc.StatusCode.FAILED_PRECONDITION: "if it is attached, detach it first: elv detach NAME --pid PID",
        grpc.StatusCode.RESOURCE_EXHAUSTED: "free space in the pool (delete volumes or snapshots) or grow it",
        grpc.StatusCode.ALREADY_EXISTS: "pick another name, or ask for what the existing one has",
        grpc.StatusCode.ABORTED: "another operation on it is running; try again in a moment",
        grpc.StatusCode.DEADLINE_EXCEEDED: "it is still running in the driver; run the same command again to wait for it",
    }
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"no ELV driver answers on {endpoint}"
    return CliError(f"{details} ({code.name})", hints.get(code, ""))


async def call(endpoint: str, fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return await fn()
    except grpc.aio.AioRpcError as e:
        raise explain(e, endpoint) from None


async def with_progress(what: str, work: Awaitable[T], quiet: bool = False) -> T:
    """Await ``work``; on a terminal, show a spinner with the elapsed time, so a
    long copy (a clone, a snapshot) visibly progresses."""
    task = asyncio.ensure_future(work)
    if quiet or not sys.stderr.isatty():
        return await task
    loop = asyncio.get_running_loop()
    start = loop.time()
    frames = "|/-\\"
    i = 0
    while not task.done():
        sys.stderr.write(f"\r{frames[i % 4]} {what} ({loop.time() - start:.0f}s)")
        sys.stderr.flush()
        i += 1
        await asyncio.wait({task}, timeout=0.25)
    sys.stderr.write("\r" + " " * (len(what) + 12) + "\r")
    return task.result()


async def plugin(client: Client) -> csi_pb2.GetPluginInfoResponse:
    return await call(
        client.endpoint, lambda: client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
    )


async def all_volumes(client: Client) -> list[csi_pb2.ListVolumesResponse.Entry]:
    out: list[csi_pb2.ListVolumesResponse.Entry] = []
    token = ""
    while True:
        page = await call(client.endpoint, _lister(client, token))
        out.extend(page.entries)
        if not page.next_token:
            return out
        token = page.next_token


def _lister(client: Client, token: str) -> Callable[[], Awaitable[csi_pb2.ListVolumesResponse]]:
    return lambda: client.controller.ListVolumes(csi_pb2.ListVolumesRequest(starting_token=token), timeout=60)


def volume_name(v: csi_pb2.Volume) -> str:
    return v.volume_context.get(NAME_KEY, "")


async def find_volume(client: Client, name_or_id: str) -> csi_pb2.ListVolumesResponse.Entry:
    for e in await all_volumes(client):
        if name_or_id in (volume_name(e.volume), e.volume.volume_id):
            return e
    raise CliError(f"no volume named {name_or_id!r}", "see `elv volume list`")


async def all_snapshots(client: Client) -> list[csi_pb2.Snapshot]:
    out: list[csi_pb2.Snapshot] = []
    token = ""
    while True:
        page = await call(client.endpoint, _snapshot_lister(client, token))
        out.extend(e.snapshot for e in page.entries)
        if not page.next_token:
            return out
        token = page.next_token


def _snapshot_lister(client: Client, token: str) -> Callable[[], Awaitable[csi_pb2.ListSnapshotsResponse]]:
    req = csi_pb2.ListSnapshotsRequest(starting_token=token)
    return lambda: client.controller.ListSnapshots(req, timeout=60)


async def find_snapshot(client: Client, name_or_id: str) -> csi_pb2.Snapshot:
    """The snapshot with this ID, or the one this name can belong to. CSI shows
    a snapshot's ID but not its name; every ID starts with its name's hash
    (csi.model.ids), which picks it out of the listing."""
    snaps = await all_snapshots(client)
    for s in snaps:
        if s.snapshot_id == name_or_id:
            return s
    named = [s for s in snaps if (oid := ids.parse(s.snapshot_id, "s")) is not None and oid.may_be_named(name_or_id)]
    if len(named) == 1:
        return named[0]
    if named:
        raise CliError(
            f"{len(named)} snapshots may be named {name_or_id!r}", "give its ID (`elv volume show VOLUME` lists them)"
        )
    raise CliError(f"no snapshot named {name_or_id!r}", "list them with `elv volume show VOLUME`")


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))
