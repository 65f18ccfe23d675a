"""How many bytes the pool's images really occupy, without scanning per request.

GetCapacity and every CreateVolume need the pool's allocated bytes. Summing
``st_blocks`` over every image is O(volumes): 10,000 stats on each request
would make CreateVolume slower as the node fills. Instead each image's
allocation is tracked: set when ELV creates, copies, grows or deletes one,
and refreshed by a full scan in a worker thread every few seconds (pods
write into sparse images, so allocation grows behind our back). Until a
refresh sees that growth the figure is low; the pool's free space (statvfs,
always fresh) still shrinks, so GetCapacity errs on the side of promising less.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

log = logging.getLogger(__name__)


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


class Allocation:
    def __init__(self, volumes_dir: str, snapshots_dir: str, refresh_every: float = 10.0) -> None:
        self._dirs = {"volumes": volumes_dir, "snapshots": snapshots_dir}
        self._sizes: dict[str, dict[str, int]] = {"volumes": {}, "snapshots": {}}
        self._totals = {"volumes": 0, "snapshots": 0}
        self._every = refresh_every
        self._last = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    def scan(self) -> None:
        """A full, blocking scan (at startup, and in the background)."""
        for kind, directory in self._dirs.items():
            sizes: dict[str, int] = {}
            with os.scandir(directory) as it:
                for entry in it:
                    if entry.name.endswith(".img"):
                        with contextlib.suppress(FileNotFoundError):
                            sizes[entry.path] = entry.stat(follow_symlinks=False).st_blocks * 512
            self._sizes[kind] = sizes
            self._totals[kind] = sum(sizes.values())
        self._last = time.monotonic()

    async def totals(self) -> tuple[int, int]:
        """(volume bytes, snapshot bytes); never waits for a scan."""
        if time.monotonic() - self._last > self._every and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.ensure_future(asyncio.to_thread(self.scan))
        return self._totals["volumes"], self._totals["snapshots"]

    async def settle(self) -> None:
        """Wait for a background scan still running (at shutdown)."""
        if self._refreshing is not None:
            await asyncio.gather(self._refreshing, return_exceptions=True)

    def _kind(self, path: str) -> str:
        return "snapshots" if os.path.dirname(path) == self._dirs["snapshots"] else "volumes"

    async def track(self, path: str) -> None:
        """Re-read one image's allocation (after ELV created, copied or grew it)."""
        size = await asyncio.to_thread(_allocated, path)
        self._set(path, size)

    def forget(self, path: str) -> None:
        self._set(path, 0, drop=True)

    def _set(self, path: str, size: int, drop: bool = False) -> None:
        kind = self._kind(path)
        old = self._sizes[kind].pop(path, 0)
        if not drop:
            self._sizes[kind][path] = size
        self._totals[kind] += (0 if drop else size) - old
