"""The LVM backend: device classes of thick and thin LVs, LVM metadata the only state.

backend.py (LvmBackend) and its parts: store.py (LvStore: ELV's LVs, found by
ID, activated, capacity reserved), snapshots.py, clone.py, node.py, wipe.py,
recovery.py; classes.py and selector.py read the configuration, params.py
declares the StorageClass parameters, model.py maps objects to LV names and
tags, report.py parses LVM's output and classifies its failures (the only
place that reads stderr), command.py runs lvm, inventory.py caches the view.

Imports the contract (csi.backend.base, freeze), host, config, model and
errors, as every backend may; nothing above. No module of it imports another
that imports it back (import-linter's acyclic contract).
"""

from __future__ import annotations

import os
import socket

from csi.backend.lvm.backend import LvmBackend
from csi.backend.lvm.changes import ChangeShell
from csi.backend.lvm.classes import LvmSettings, from_flags, parse_config
from csi.backend.lvm.command import Lvm
from csi.backend.lvm.report import valid_tag
from csi.backend.lvm.shell import LvmShell
from csi.backend.lvm.store import LvStore
from csi.config import Config
from csi.errors import ConfigError
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
        try:
            with open(config.lvm_config, encoding="utf-8") as f:
                return parse_config(f.read())
        except OSError as e:
            raise ConfigError(str(e)) from e
    return from_flags(config.lvm_vg, config.lvm_thin_pool, config.lvm_devices, config.overprovision_ratio)


def build(config: Config, runner: Runner) -> LvmBackend:
    settings = settings_from(config)
    owner = config.driver_name
    if not valid_tag(f"elv.owner={owner}"):
        raise ConfigError(f"the driver name {owner!r} cannot be used in an LVM tag")
    udev = {"on": True, "off": False}.get(settings.udev)
    if udev is None:
        udev = udev_alive()
    shell = LvmShell(runner, os.path.join(config.run_dir, "lvm-shell")) if settings.query_shell else None
    changes = ChangeShell(runner, os.path.join(config.run_dir, "lvm-changes")) if settings.change_shell else None
    lvm = Lvm(
        runner,
        udev=udev,
        monitoring=settings.monitoring,
        timeout=config.command_timeout,
        shell=shell,
        changes=changes,
        vgs=settings.vgs,
    )
    store = LvStore(settings, lvm, runner, FsTool(runner, xfs_config=config.xfs_config), owner, make_nodes=not udev)
    return LvmBackend(settings, store)
