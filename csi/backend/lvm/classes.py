"""Device classes: which volume group (and thin pool) a volume lives in.

A class comes from the flags (``--lvm-vg``, ``--lvm-thin-pool``,
``--lvm-devices``: one class, named ``default``) or from a TOML file
(``--lvm-config``)::

    default-class = "thick"
    udev = "auto"            # auto | on | off: off = LVM makes /dev nodes itself
    monitoring = false       # optional: activation/monitoring (dmeventd)
    freeze-dir = "/run/elv"  # crash markers of frozen filesystems
    query-shell = true       # reports from one resident `lvm shell` (false: an lvm per report)
    change-shell = true      # changes from a second one (false: an lvm per change)

    [[device-class]]
    name = "thick"           # [a-z][a-z0-9]{0,15}: it is part of every volume ID
    vg = "elv"
    devices = "path=/dev/disk/by-id/nvme-*,min-size=100G"   # optional VG builder

    [[device-class]]
    name = "thin"
    vg = "elv"
    thin-pool = "pool0"
    overprovision-ratio = 4.0
    full-threshold = 90      # percent of pool data/metadata that marks volumes abnormal
    thin-pool-size = "90%FREE"   # only with devices: create the pool if missing

The StorageClass parameter ``elv.csi.dev/device-class`` picks a class; the
default class serves the rest.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from csi.backend.lvm.report import valid_name
from csi.backend.lvm.selector import parse_selector
from csi.errors import ConfigError, UnknownClass
from csi.model import DEVICE_CLASS

_CLASS = re.compile(r"\A[a-z][a-z0-9]{0,15}\Z")
_POOL_SIZE = re.compile(r"\A[1-9][0-9]?%(FREE|VG)\Z|\A100%(FREE|VG)\Z")


@dataclass(frozen=True)
class DeviceClass:
    name: str
    vg: str
    thin_pool: str | None = None
    overprovision_ratio: float = 1.0
    full_threshold: float = 90.0
    devices: str | None = None
    thin_pool_size: str = "90%FREE"

    @property
    def thin(self) -> bool:
        return self.thin_pool is not None


@dataclass(frozen=True)
class LvmSettings:
    classes: Mapping[str, DeviceClass]
    default: str
    udev: str = "auto"
    monitoring: bool | None = None
    freeze_dir: str = "/run/elv"
    query_shell: bool = True
    change_shell: bool = True

    def pick(self, parameters: Mapping[str, str]) -> DeviceClass:
        """The class a StorageClass's parameters ask for (InvalidArgument if unknown)."""
        name = parameters.get(DEVICE_CLASS) or self.default
        cls = self.classes.get(name)
        if cls is None:
            known = ", ".join(sorted(self.classes))
            raise UnknownClass(f"{DEVICE_CLASS}={name!r} is not a configured device class; configured: {known}")
        return cls

    @property
    def vgs(self) -> list[str]:
        return sorted({c.vg for c in self.classes.values()})


def make_class(
    name: str,
    vg: str,
    thin_pool: str | None = None,
    *,
    overprovision_ratio: float = 1.0,
    full_threshold: float = 90.0,
    devices: str | None = None,
    thin_pool_size: str = "90%FREE",
) -> DeviceClass:
    if not _CLASS.match(name):
        raise ConfigError(f"device class name {name!r} must match [a-z][a-z0-9]{{0,15}}")
    if not valid_name(vg):
        raise ConfigError(f"device class {name}: {vg!r} is not a valid volume group name")
    if thin_pool is not None and not valid_name(thin_pool):
        raise ConfigError(f"device class {name}: {thin_pool!r} is not a valid thin pool name")
    if overprovision_ratio < 1.0:
        raise ConfigError(f"device class {name}: the overprovision ratio must be at least 1.0")
    if thin_pool is None and overprovision_ratio != 1.0:
        raise ConfigError(f"device class {name}: an overprovision ratio needs a thin pool")
    if not 1.0 <= full_threshold <= 100.0:
        raise ConfigError(f"device class {name}: full-threshold must be a percentage")
    if not _POOL_SIZE.match(thin_pool_size):
        raise ConfigError(f"device class {name}: thin-pool-size must look like 90%FREE or 50%VG")
    if devices is not None:
        parse_selector(devices)  # fail at startup, not when the disks are looked at
    return DeviceClass(name, vg, thin_pool, overprovision_ratio, full_threshold, devices, thin_pool_size)


def from_flags(vg: str | None, thin_pool: str | None, devices: str | None, overprovision_ratio: float) -> LvmSettings:
    if not vg:
        raise ConfigError("the lvm backend needs --lvm-vg (one device class) or --lvm-config (a class file)")
    ratio = overprovision_ratio if thin_pool else 1.0
    cls = make_class("default", vg, thin_pool, overprovision_ratio=ratio, devices=devices)
    return LvmSettings({cls.name: cls}, cls.name)


_CLASS_KEYS = {
    "name",
    "vg",
    "thin-pool",
    "overprovision-ratio",
    "full-threshold",
    "devices",
    "thin-pool-size",
}
_TOP_KEYS = {"default-class", "udev", "monitoring", "freeze-dir", "query-shell", "change-shell", "device-class"}


def parse_config(text: str) -> LvmSettings:
    try:
        doc: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"the lvm config is not valid TOML: {e}") from e
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown lvm config key {unknown[0]!r}")
    classes: dict[str, DeviceClass] = {}
    for entry in doc.get("device-class", []):
        cls = _device_class(entry)
        if cls.name in classes:
            raise ConfigError(f"device class {cls.name!r} is defined twice")
        classes[cls.name] = cls
    if not classes:
        raise ConfigError("the lvm config defines no [[device-class]]")
    default = str(doc.get("default-class", next(iter(classes))))
    if default not in classes:
        raise ConfigError(f"default-class {default!r} is not defined")
    udev, monitoring, freeze_dir = _host_settings(doc)
    pools = [(c.vg, c.thin_pool) for c in classes.values() if c.thin_pool]
    if len(pools) != len(set(pools)):
        raise ConfigError("two device classes use the same thin pool")
    shells = {key: doc.get(key, True) for key in ("query-shell", "change-shell")}
    for key, value in shells.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false")
    return LvmSettings(classes, default, udev, monitoring, freeze_dir, shells["query-shell"], shells["change-shell"])


def _device_class(entry: object) -> DeviceClass:
    """One ``[[device-class]]`` table."""
    if not isinstance(entry, dict):
        raise ConfigError("each [[device-class]] must be a table")
    bad = sorted(set(entry) - _CLASS_KEYS)
    if bad:
        raise ConfigError(f"unknown device-class key {bad[0]!r}")
    try:
        return make_class(
            str(entry["name"]),
            str(entry["vg"]),
            str(entry["thin-pool"]) if "thin-pool" in entry else None,
            overprovision_ratio=float(entry.get("overprovision-ratio", 1.0)),
            full_threshold=float(entry.get("full-threshold", 90.0)),
            devices=str(entry["devices"]) if "devices" in entry else None,
            thin_pool_size=str(entry.get("thin-pool-size", "90%FREE")),
        )
    except KeyError as e:
        raise ConfigError(f"a device class is missing {e.args[0]!r}") from e


def _host_settings(doc: dict[str, Any]) -> tuple[str, bool | None, str]:
    """The top-level keys about this host: udev, monitoring, freeze-dir."""
    udev = str(doc.get("udev", "auto"))
    if udev not in ("auto", "on", "off"):
        raise ConfigError("udev must be auto, on or off")
    monitoring = doc.get("monitoring")
    if monitoring is not None and not isinstance(monitoring, bool):
        raise ConfigError("monitoring must be true or false")
    freeze_dir = str(doc.get("freeze-dir", "/run/elv"))
    if not freeze_dir.startswith("/"):
        raise ConfigError("freeze-dir must be an absolute path")
    return udev, monitoring, freeze_dir
