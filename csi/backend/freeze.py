"""Freeze several mounted filesystems together, and thaw what a crash left frozen.

A group snapshot must catch all its members at one point in time, so every
member's filesystem is frozen before the first snapshot is taken and thawed
after the last. A marker file names each mount point before it is frozen; a
driver that dies mid-snapshot would otherwise leave the filesystem frozen and
every writer hung, so startup thaws whatever the markers name.

A marker's name also names the process that froze (pid and start time). Startup
thaws only what a dead process left: another driver sharing the marker
directory may be in the middle of its own group snapshot, and thawing its
members would break the one point in time the group promises (and make its
own thaw fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Sequence

from csi.errors import CommandError
from csi.host import procs
from csi.host.fs import FsTool

log = logging.getLogger(__name__)
SUFFIX = ".frozen"


def _write_marker(path: str, mount_point: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"mount_point": mount_point}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.asynccontextmanager
async def frozen(fs: FsTool, mount_points: Sequence[str], marker_dir: str, tag: str) -> AsyncIterator[None]:
    """Freeze ``mount_points`` (in order) for the duration; thaw in reverse."""
    done: list[tuple[str, str]] = []
    if not mount_points:
        yield  # nothing to freeze: no marker, no /proc read
        return
    owner = procs.token().replace(" ", "_")
    await asyncio.to_thread(os.makedirs, marker_dir, 0o700, True)
    try:
        for i, mp in enumerate(mount_points):
            marker = os.path.join(marker_dir, f"{tag}-{owner}-{i}{SUFFIX}")
            await asyncio.to_thread(_write_marker, marker, mp)
            try:
                await fs.freeze(mp)
            except BaseException:
                await asyncio.to_thread(_remove, marker)
                raise
            done.append((mp, marker))
        yield
    finally:
        for mp, marker in reversed(done):
            await fs.thaw(mp)
            await asyncio.to_thread(_remove, marker)


def _owner_alive(name: str) -> bool:
    """Whether the process a marker's name names (``TAG-PID_START-I.frozen``) still runs."""
    stem = name.removesuffix(".tmp").removesuffix(SUFFIX)
    parts = stem.rsplit("-", 2)
    return len(parts) == 3 and procs.alive(parts[1].replace("_", " "))


async def thaw_leftovers(fs: FsTool, marker_dir: str) -> list[str]:
    """Thaw the mount points named by markers a dead process left; return them."""
    try:
        names = await asyncio.to_thread(os.listdir, marker_dir)
    except FileNotFoundError:
        return []
    thawed = []
    for name in sorted(names):
        if not name.endswith((SUFFIX, SUFFIX + ".tmp")) or _owner_alive(name):
            continue  # not a marker, or a live process's snapshot: it thaws its own
        path = os.path.join(marker_dir, name)
        if name.endswith(".tmp"):
            await asyncio.to_thread(_remove, path)
            continue
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            mount_point = str(doc.get("mount_point", "")) if isinstance(doc, dict) else ""
        except (OSError, ValueError):
            mount_point = ""
        if mount_point.startswith("/"):
            with contextlib.suppress(CommandError):
                await fs.thaw(mount_point)
                log.warning("recovery: thawed %s, left frozen by an interrupted snapshot", mount_point)
                thawed.append(mount_point)
        await asyncio.to_thread(_remove, path)
    return thawed
