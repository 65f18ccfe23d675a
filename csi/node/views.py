"""Read-only views of a volume's device, for read-only raw block publishes.

A read-only bind mount does not make a device node read-only: the mount's
flags govern the filesystem the node lives on (devtmpfs), not the device, so
``open(O_WRONLY)`` on a node bound read-only still writes to the disk. What
the kernel does enforce is a read-only *device*. A read-only raw block
publish therefore binds a view: a read-only loop device whose backing file is
the volume's own device node (``/dev/loop3``, ``/dev/dm-2``). Writes to it
fail with EPERM, reads go through the volume's device (buffered, so they see
what writers of the device wrote), and the volume stays writable for its
other publishes. One view serves every read-only publish of a volume.

Views are found by what the kernel says (sysfs: the backing file is the
volume's device node and the device is read-only), never by a record, so a
view a killed publish left is found and reused, or removed, by the next call.
"""

from __future__ import annotations

import asyncio
import logging

from csi.host import loop as loopdev
from csi.model import Device

log = logging.getLogger(__name__)


def _device(name: str) -> Device:
    major, minor = loopdev.device_numbers(name)
    return Device(name=name, path="/dev/" + name, major=major, minor=minor)


class Views:
    def __init__(self, loops: loopdev.LoopTool, sys_block: str = loopdev.SYS_BLOCK) -> None:
        self._loops = loops
        self._sys_block = sys_block

    def _scan(self, dev: Device) -> list[Device]:
        found = []
        for d in loopdev.scan(self._sys_block):
            if d.backing_file == dev.path and not d.deleted and loopdev.read_only(d.name, self._sys_block):
                found.append(_device(d.name))
        return found

    async def of(self, dev: Device) -> list[Device]:
        """Every read-only view of the device."""
        return await asyncio.to_thread(self._scan, dev)

    async def get(self, dev: Device) -> tuple[Device, bool]:
        """A view of the device, and whether this call made it."""
        found = await self.of(dev)
        if found:
            return found[0], False
        size = await asyncio.to_thread(loopdev.logical_block_size, dev.name, self._sys_block)
        name = await self._loops.attach_read_only(dev.path, size)
        view = await asyncio.to_thread(_device, name)
        log.info("made %s, a read-only view of %s", view.path, dev.path)
        return view, True

    async def drop(self, view: Device) -> None:
        await self._loops.detach(view.name)
        log.info("removed %s, a read-only view", view.path)

    async def refresh(self, dev: Device) -> None:
        """Make the views see the device's new size (after an expansion)."""
        for view in await self.of(dev):
            await self._loops.refresh_capacity(view.name)
