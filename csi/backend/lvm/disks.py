"""Building a device class's VG from empty disks (``--lvm-devices`` / ``devices``).

A selector (csi.backend.lvm.selector) is a comma-separated list of
``key=value`` terms, all of which a disk must match.

Disks are found with pyudev, which reads sysfs and needs no udev daemon.
A disk is used only if it is provably empty: no partitions, no holders
(nothing stacked on it), not mounted, not read-only, and ``blkid -p`` finds
no signature of any kind on it. Anything else is left alone, and logged.
The class's VG is created from the chosen disks, or extended with them; a
thin class then gets its pool (``thin-pool-size`` of the VG, zeroing on,
error when full).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from csi.backend.lvm.classes import DeviceClass
from csi.backend.lvm.selector import Disk, matches, parse_selector
from csi.backend.lvm.store import LvStore
from csi.errors import Unavailable
from csi.host.mountinfo import MountTable

log = logging.getLogger(__name__)


def list_disks() -> list[Disk]:
    """Whole disks from sysfs, through pyudev (an optional dependency)."""
    try:
        import pyudev  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - depends on the install
        raise Unavailable("--lvm-devices needs pyudev: pip install 'elv[udev]'") from e
    out = []
    for dev in pyudev.Context().list_devices(subsystem="block", DEVTYPE="disk"):
        node = dev.device_node
        if not node:
            continue

        def attr(name: str, d: Any = dev) -> str:
            try:
                return str(d.attributes.asstring(name)).strip()
            except (KeyError, UnicodeDecodeError):
                return ""

        sectors = attr("size")
        partitions = sum(1 for c in dev.children if c.device_type == "partition")
        holders_dir = os.path.join(dev.sys_path, "holders")
        holders = len(os.listdir(holders_dir)) if os.path.isdir(holders_dir) else 0
        out.append(
            Disk(
                node=node,
                links=tuple(dev.device_links),
                model=attr("device/model") or str(dev.properties.get("ID_MODEL", "")),
                serial=attr("serial") or attr("device/serial") or str(dev.properties.get("ID_SERIAL_SHORT", "")),
                size=int(sectors) * 512 if sectors.isdigit() else 0,
                partitions=partitions,
                holders=holders,
                readonly=attr("ro") == "1",
                major=os.major(dev.device_number),
                minor=os.minor(dev.device_number),
            )
        )
    return sorted(out, key=lambda d: d.node)


async def empty(store: LvStore, disk: Disk, table: MountTable) -> str | None:
    """Why the disk must not be touched, or None if it is provably empty."""
    if disk.readonly:
        return "read-only"
    if disk.partitions:
        return f"{disk.partitions} partitions"
    if disk.holders:
        return "in use by another device (holders)"
    if table.of_device(disk.major, disk.minor):
        return "mounted"
    probe = await store.fs.probe(disk.node)
    if not probe.blank:
        return "carries " + (probe.fstype or ", ".join(sorted(probe.fields)) or "a signature")
    return None


async def build_vg(store: LvStore, cls: DeviceClass, vg_exists: bool, pool_exists: bool) -> None:
    """Create or extend the class's VG from the empty disks its selector picks."""
    assert cls.devices is not None
    sel = parse_selector(cls.devices)
    disks = [d for d in await asyncio.to_thread(list_disks) if matches(sel, d)]
    table = await asyncio.to_thread(MountTable.load)
    chosen = []
    for d in disks:
        why = await empty(store, d, table)
        if why:
            log.info("device class %s: leaving %s alone (%s)", cls.name, d.node, why)
        else:
            chosen.append(d.node)
    try:
        if chosen and not vg_exists:
            await store.lvm.change("vgcreate", "-y", cls.vg, *chosen)
            log.info("device class %s: created VG %s from %s", cls.name, cls.vg, ", ".join(chosen))
        elif chosen:
            await store.lvm.change("vgextend", "-y", cls.vg, *chosen)
            log.info("device class %s: extended VG %s with %s", cls.name, cls.vg, ", ".join(chosen))
        if cls.thin_pool is not None and not pool_exists and (vg_exists or chosen):
            await store.lvm.change(
                "lvcreate",
                "-y",
                "--type",
                "thin-pool",
                "-Z",
                "y",
                "-l",
                cls.thin_pool_size,
                "-n",
                cls.thin_pool,
                cls.vg,
            )
            # A full pool fails writes with ENOSPC at once instead of queueing
            # them for 60 s (docs/lvm.md, "A full thin pool"). lvcreate refuses
            # the option for a thin pool (LVM 2.03): it is set right after.
            await store.lvm.change("lvchange", "--errorwhenfull", "y", f"{cls.vg}/{cls.thin_pool}")
            log.info("device class %s: created thin pool %s/%s", cls.name, cls.vg, cls.thin_pool)
    finally:
        store.inv.invalidate()
