"""Startup: check the device classes, then finish or remove what a crash left.

* filesystems a dead snapshot left frozen are thawed (freeze markers);
* an LV still tagged ``elv.pending`` is a clone whose copy did not finish,
  or a member of a group snapshot that did not finish (then all its members
  go: a group is whole or absent), and an ``elv-t-*`` LV is a temporary copy
  source: all are quarantined (they hold tenant data, so they are wiped, not
  just removed);
* an LV tagged ``elv.wipe`` is a delete that did not finish: the wiper
  takes it from there.

LVs without ELV's owner tag are never looked at twice.
"""

from __future__ import annotations

import logging

from csi.backend import freeze
from csi.backend.lvm import model
from csi.backend.lvm.store import LvStore, zeroing_fix
from csi.backend.lvm.wipe import Wiper
from csi.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)


async def check_classes(store: LvStore) -> None:
    view = await store.view(fresh=True)
    for cls in store.settings.classes.values():
        if cls.vg in view.missing or cls.vg not in view.vgs:
            raise Unavailable(f"volume group {cls.vg} of device class {cls.name} does not exist")
        if cls.thin_pool is None:
            continue
        pool = view.lv(cls.vg, cls.thin_pool)
        if pool is None or not pool.thin_pool:
            raise Unavailable(f"thin pool {cls.vg}/{cls.thin_pool} of device class {cls.name} does not exist")
        if pool.zero is not True:
            raise ConfigError(f"cannot serve device class {cls.name}: {zeroing_fix(cls.name, pool)}")


async def build_from_disks(store: LvStore) -> None:
    """Classes with a device selector make or grow their VG (and pool) first."""
    for cls in sorted(store.settings.classes.values(), key=lambda c: c.name):
        if cls.devices is None:
            continue
        from csi.backend.lvm.disks import build_vg

        view = await store.view(fresh=True)
        pool = view.lv(cls.vg, cls.thin_pool) if cls.thin_pool else None
        await build_vg(store, cls, cls.vg in view.vgs, pool is not None)


async def recover(store: LvStore, wiper: Wiper) -> None:
    for mp in await freeze.thaw_leftovers(store.fs, store.settings.freeze_dir):
        log.warning("recovery: thawed %s", mp)
    await build_from_disks(store)
    await check_classes(store)
    view = await store.view(fresh=True)
    quarantined = 0
    unfinished = model.unfinished_groups(view.all(), store.owner)
    for lv in view.all():
        if not model.owned(lv, store.owner) or lv.has(model.WIPE):
            quarantined += lv.has(model.WIPE) and model.owned(lv, store.owner)
            continue
        if lv.has(model.PENDING) or lv.tag(model.KIND) == "t" or lv.tag(model.GROUP) in unfinished:
            log.warning("recovery: quarantining %s/%s, left half-made by an interrupted operation", lv.vg, lv.name)
            await wiper.quarantine(lv)
            quarantined += 1
    log.info(
        "lvm backend: %d device classes (%s), %d LVs to wipe",
        len(store.settings.classes),
        ", ".join(sorted(store.settings.classes)),
        quarantined,
    )
