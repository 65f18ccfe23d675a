"""The LVM backend: device classes of thick and thin LVs (see backend.py)."""

from __future__ import annotations

import socket

from csi.backend.base import Backend
from csi.backend.lvm.classes import ConfigError, LvmSettings, from_flags, parse_config
from csi.backend.lvm.command import Lvm
from csi.backend.lvm.core import Core
from csi.backend.lvm.report import valid_tag
from csi.config import Config
from csi.host.fs import FsTool
from csi.host.runner import Runner

UDEV_CONTROL = "/run/udev/control"


def udev_alive(path: str = UDEV_CONTROL) -> bool:
    """Is a udev daemon listening? A stale control socket (udevd gone) made
    lvcreate wait for a udev cookie forever (lvm-vm notes), so the file's
    existence is not enough: connect to it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.settimeout(1.0)
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def settings_from(config: Config) -> LvmSettings:
    if config.lvm_config:
        with open(config.lvm_config, encoding="utf-8") as f:
            return parse_config(f.read())
    return from_flags(config.lvm_vg, config.lvm_thin_pool, config.lvm_devices, config.overprovision_ratio)


def build(config: Config, runner: Runner) -> Backend:
    from csi.backend.lvm.backend import LvmBackend

    try:
        settings = settings_from(config)
    except (ConfigError, OSError) as e:
        raise SystemExit(f"elv: {e}") from None
    owner = config.driver_name
    if not valid_tag(f"elv.owner={owner}"):
        raise SystemExit(f"elv: the driver name {owner!r} cannot be used in an LVM tag")
    udev = {"on": True, "off": False}.get(settings.udev)
    if udev is None:
        udev = udev_alive()
    lvm = Lvm(runner, udev=udev, monitoring=settings.monitoring, timeout=config.command_timeout)
    core = Core(settings, lvm, runner, FsTool(runner, xfs_config=config.xfs_config), owner, make_nodes=not udev)
    return LvmBackend(settings, core)
