"""Building a device class's VG from empty disks (``--lvm-devices`` / ``devices``).

A selector is a comma-separated list of ``key=value`` terms, all of which a
disk must match::

    path=/dev/disk/by-id/nvme-*     shell glob on the device node or any of its symlinks
    model=Samsung*                  glob on the model (sysfs device/model)
    serial=S4EWNX0R*                glob on the serial (sysfs serial or device/serial)
    min-size=100G                   at least this big (K, M, G, T: powers of 1024)

Disks are found with pyudev, which reads sysfs and needs no udev daemon.
A disk is used only if it is provably empty: no partitions, no holders
(nothing stacked on it), not mounted, not read-only, and ``blkid -p`` finds
no signature of any kind on it. Anything else is left alone, and logged.
The class's VG is created from the chosen disks, or extended with them; a
thin class then gets its pool (``thin-pool-size`` of the VG, zeroing on).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from csi.backend.lvm.classes import ConfigError, DeviceClass
from csi.backend.lvm.core import Core
from csi.errors import Unavailable
from csi.host.mountinfo import MountTable

log = logging.getLogger(__name__)
_SIZE = re.compile(r"\A([0-9]+)([KMGT]?)i?B?\Z", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


@dataclass(frozen=True)
class Selector:
    path: str | None = None
    model: str | None = None
    serial: str | None = None
    min_size: int = 0


@dataclass(frozen=True)
class Disk:
    node: str
    links: tuple[str, ...]
    model: str
    serial: str
    size: int
    partitions: int
    holders: int
    readonly: bool
    major: int
    minor: int


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise ConfigError(f"{text!r} is not a size like 100G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_selector(text: str) -> Selector:
    fields: dict[str, str] = {}
    for term in text.split(","):
        key, sep, value = term.strip().partition("=")
        if not sep or not value:
            raise ConfigError(f"device selector term {term!r} must be key=value")
        if key not in ("path", "model", "serial", "min-size") or key in fields:
            raise ConfigError(f"device selector key {key!r} is unknown or repeated")
        fields[key] = value
    if "path" not in fields and "model" not in fields and "serial" not in fields:
        raise ConfigError("a device selector needs at least one of path, model or serial")
    return Selector(
        fields.get("path"), fields.get("model"), fields.get("serial"), parse_size(fields.get("min-size", "0"))
    )


def matches(sel: Selector, disk: Disk) -> bool:
    if sel.path and not any(fnmatch.fnmatchcase(p, sel.path) for p in (disk.node, *disk.links)):
        return False
    if sel.model and not fnmatch.fnmatchcase(disk.model, sel.model):
        return False
    if sel.serial and not fnmatch.fnmatchcase(disk.serial, sel.serial):
        return False
    return disk.size >= sel.min_size


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


async def empty(core: Core, disk: Disk, table: MountTable) -> str | None:
    """Why the disk must not be touched, or None if it is provably empty."""
    if disk.readonly:
        return "read-only"
    if disk.partitions:
        return f"{disk.partitions} partitions"
    if disk.holders:
        return "in use by another device (holders)"
    if table.of_device(disk.major, disk.minor):
        return "mounted"
    probe = await core.fs.probe(disk.node)
    if not probe.blank:
        return "carries " + (probe.fstype or ", ".join(sorted(probe.fields)) or "a signature")
    return None


async def build_vg(core: Core, cls: DeviceClass, vg_exists: bool, pool_exists: bool) -> None:
    """Create or extend the class's VG from the empty disks its selector picks."""
    assert cls.devices is not None
    sel = parse_selector(cls.devices)
    disks = [d for d in await asyncio.to_thread(list_disks) if matches(sel, d)]
    table = await asyncio.to_thread(MountTable.load)
    chosen = []
    for d in disks:
        why = await empty(core, d, table)
        if why:
            log.info("device class %s: leaving %s alone (%s)", cls.name, d.node, why)
        else:
            chosen.append(d.node)
    try:
        if chosen and not vg_exists:
            await core.lvm.change("vgcreate", "-y", cls.vg, *chosen)
            log.info("device class %s: created VG %s from %s", cls.name, cls.vg, ", ".join(chosen))
        elif chosen:
            await core.lvm.change("vgextend", "-y", cls.vg, *chosen)
            log.info("device class %s: extended VG %s with %s", cls.name, cls.vg, ", ".join(chosen))
        if cls.thin_pool is not None and not pool_exists and (vg_exists or chosen):
            await core.lvm.change("lvcreate", "-y", "--type", "thin-pool", "-Z", "y", "-l", cls.thin_pool_size,
                                  "-n", cls.thin_pool, cls.vg)  # fmt: skip
            log.info("device class %s: created thin pool %s/%s", cls.name, cls.vg, cls.thin_pool)
    finally:
        core.inv.invalidate()
