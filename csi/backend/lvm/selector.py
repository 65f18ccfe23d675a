"""Device selectors (``--lvm-devices`` / a class's ``devices``): parsed and
matched by pure functions, so a bad selector fails at startup (see
csi.backend.lvm.disks for the disks themselves)::

    path=/dev/disk/by-id/nvme-*     shell glob on the device node or any of its symlinks
    model=Samsung*                  glob on the model (sysfs device/model)
    serial=S4EWNX0R*                glob on the serial (sysfs serial or device/serial)
    min-size=100G                   at least this big (K, M, G, T: powers of 1024)
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from csi.errors import ConfigError

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
