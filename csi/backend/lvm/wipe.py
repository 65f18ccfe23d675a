"""Quarantine and wipe: a deleted LV's extents never reach the next tenant.

TopoLVM #1150 (open): a new LV got a deleted one's extents and showed its
data, because ``lvcreate -W y`` only clears signatures. ELV deletes in two
steps that each survive a crash:

1. **Quarantine** (in the RPC): tag the LV ``elv.wipe``: from then on it is
   deleted for every reader. One lvchange is the commit point. If a new
   volume wants the CSI name back before the wipe is done, the LV is renamed
   ``elv-q-<random>`` first.
2. **Wipe** (in the background): zero the LV (``blkdiscard -z``: the kernel's
   zero-out, which uses the device's write-zeroes support or writes zero
   pages), or for a copy-on-write snapshot its ``-cow`` store, which holds
   the origin's old blocks (with the same ioctl, as the snapshot target
   holds that store open exclusively); then ``lvremove``.

Startup finds every LV tagged ``elv.wipe`` and finishes the job, so a crash
anywhere only delays it. A thick origin waits until its snapshots are gone
(writing zeros into it would copy its old blocks into every snapshot first).

A thin LV is never zeroed, only removed. Zeroing it (``blkdiscard -z``,
BLKZEROOUT) would map every block of its virtual size in the pool: a deleted
400 MiB volume took the pool from 10 % to 39 %, and a delete could fill the
pool its neighbours write to. Its blocks go back to the pool with lvremove,
and the next tenant reads zeros because ELV serves only pools that zero new
blocks (store.zeroing_fix; a discard would not protect a pool that does not:
a new LV there read the old bytes back).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import threading

from csi.backend.lvm import devnode, model
from csi.backend.lvm.inventory import View
from csi.backend.lvm.report import LvInfo, not_found
from csi.backend.lvm.store import LvStore
from csi.errors import CommandError, ElvError
from csi.host.stoppable import Stopped, run_stoppable

log = logging.getLogger(__name__)

MiB = 1024 * 1024
RETRY_SECONDS = 30.0


class Wiper:
    def __init__(self, store: LvStore) -> None:
        self.store = store
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def quarantine(self, lv: LvInfo, rename: bool = True) -> None:
        """Take the LV out of service now; the wipe follows in the background.

        The tag alone is the commit point (one lvchange, so DeleteVolume costs
        one LVM call); the rename that frees the CSI name happens only when a
        new volume wants that name back (``rename``) or before the wipe."""
        run = self.store.lvm.change
        try:
            if not lv.has(model.WIPE):
                await run("lvchange", "--addtag", model.WIPE, f"{lv.vg}/{lv.name}")
            if rename and not lv.name.startswith("elv-q-"):
                await run("lvrename", lv.vg, lv.name, model.quarantine_name())
        except CommandError as e:
            # The wiper may have removed it meanwhile: then the name is free, as wanted.
            if not not_found(e):
                raise
        finally:
            self.store.inv.invalidate()
        self.kick()

    def kick(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="elv-lvm-wiper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                left, removed = await self.pass_once()
            except Exception:
                log.exception("wipe pass failed; retrying in %.0fs", RETRY_SECONDS)
                left, removed = 1, 0
            if left and removed:
                continue  # a removed snapshot may have freed its origin: go again now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=RETRY_SECONDS if left else None)

    async def pass_once(self) -> tuple[int, int]:
        """Wipe and remove every quarantined LV that can go now; return how many
        remain and how many were removed. LVM is called once per step for the
        whole batch (one activation, one removal): each call costs seconds
        under emulation and a deleted volume holds its extents until then."""
        self.store.inv.forget_task_view()  # this task lives on: never reuse an old pass's view
        view = await self.store.view(fresh=True)
        todo = [lv for lv in view.all() if model.owned(lv, self.store.owner) and lv.has(model.WIPE)]
        return await self.finish(view, todo)

    async def finish(self, view: View, todo: list[LvInfo]) -> tuple[int, int]:
        """Wipe and remove these quarantined LVs now (also used by an RPC that
        needs them gone, e.g. growing an origin whose deleted snapshots wait)."""
        ready = [lv for lv in todo if not lv.is_origin]  # an origin's snapshots still need its blocks
        left = len(todo) - len(ready)
        zero = [lv for lv in ready if self.store.wipe_needed(view, lv)]
        # A COW snapshot is activated through its origin (LVM activates them together).
        inactive = sorted({f"{lv.vg}/{lv.origin if lv.cow_snapshot else lv.name}" for lv in zero if not lv.active})
        if inactive:
            await self._activate(inactive)
        removable = [lv for lv in ready if lv not in zero]
        for lv in zero:
            try:
                await self._zero(lv)
                removable.append(lv)
            except (ElvError, OSError) as e:
                left += 1
                log.warning("wiping %s/%s failed (will retry): %s", lv.vg, lv.name, e)
        removed = await self._remove(removable)
        return left + len(removable) - removed, removed

    async def _activate(self, paths: list[str]) -> None:
        try:
            await self.store.lvm.change("lvchange", "-ay", "-K", *paths)
        except CommandError:
            # One bad LV must not hold up the rest: one by one, and what still
            # fails is retried on the next pass (its wipe finds no device).
            for path in paths:
                try:
                    await self.store.lvm.change("lvchange", "-ay", "-K", path)
                except CommandError as e:
                    log.warning("activating %s to wipe it failed (will retry): %s", path, e.message)
        finally:
            self.store.inv.invalidate()

    async def _remove(self, lvs: list[LvInfo]) -> int:
        if not lvs:
            return 0
        try:
            await self.store.lvm.change("lvremove", "-y", *(f"{lv.vg}/{lv.name}" for lv in lvs))
            done = lvs
        except CommandError as e:
            if not not_found(e):
                raise
            # One was renamed under us (a create wanted its name back): one by one.
            done = []
            for lv in lvs:
                try:
                    await self.store.lvm.change("lvremove", "-y", f"{lv.vg}/{lv.name}")
                    done.append(lv)
                except CommandError as e1:
                    if not not_found(e1):
                        raise
        finally:
            self.store.inv.invalidate()
        for lv in done:
            log.info("%s %s/%s (%d bytes)", "wiped and removed" if not lv.thin else "removed", lv.vg, lv.name, lv.size)
        return len(done)

    async def _zero(self, lv: LvInfo) -> None:
        """Zero the LV's blocks (for a COW snapshot: its exception store). It is active."""
        if lv.thin:
            # Never: it would allocate the LV's whole virtual size (see the module doc).
            raise ElvError(f"refusing to zero thin LV {lv.vg}/{lv.name}")
        name = devnode.dm_name(lv.vg, lv.name, "cow" if lv.cow_snapshot else None)
        # The snapshot device shows the origin; the tenant's old blocks sit in
        # the exception store, a hidden device LVM calls <vg>-<lv>-cow.
        found = await asyncio.to_thread(devnode.find_dm_by_name, name)
        if found is None:
            raise ElvError(f"the device {name} of quarantined {lv.vg}/{lv.name} is not active")
        dev = await devnode.wait_for_device(found[1], found[2], make_nodes=self.store.make_nodes)
        if lv.cow_snapshot:
            # The active snapshot target holds its store open exclusively, so
            # blkdiscard (which opens with O_EXCL) gets EBUSY: zero it directly.
            await run_stoppable(lambda stop: zero_out(dev.path, stop))
            return
        # A slow disk zeroes at tens of MiB/s; never kill a wipe for being slow.
        timeout = 600 + lv.size / (20 * MiB)
        await self.store.lvm_tool(["blkdiscard", "-z", dev.path], timeout)


BLKZEROOUT = 0x127F  # _IO(0x12, 127): the kernel's zero-out, as blkdiscard -z uses
#: One ioctl's share: small enough that a stop request (shutdown) is seen within a second or two.
ZERO_STEP = 32 * MiB


def zero_out(path: str, stop: threading.Event | None = None) -> None:
    """Zero a whole block device with BLKZEROOUT (write-zeroes where the device
    can, zero pages otherwise), opened without O_EXCL; between steps, give up
    (Stopped) once ``stop`` is set: the LV stays quarantined and is wiped again."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        for start in range(0, size, ZERO_STEP):
            if stop is not None and stop.is_set():
                raise Stopped(f"zeroing {path} stopped at byte {start} of {size}")
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", start, min(ZERO_STEP, size - start)))
        os.fsync(fd)
    finally:
        os.close(fd)
