"""What a device class can still promise. Pure functions over one LVM view.

Both reference drivers got thin pools wrong, each in its own way:

* openebs/lvm-localpv #458 and #382 reported the **VG's** free space for thin
  volumes: a pool that fills its VG (the usual layout) showed 0 and every
  thin PVC stayed Pending. #210 counted an empty pool's size as used.
* topolvm/topolvm #622 published the thick VG's free space as the default
  capacity when the default class was thin; #961 computed
  ``ratio * pool - virtual`` in unsigned integers, so a pool promised beyond
  its ratio wrapped around to an enormous capacity.

ELV's answer for a thin class::

    promise  = floor(pool_data_size * ratio) - sum(virtual sizes of every thin LV in the pool)
    physical = floor(pool_free_data * ratio)
    available = max(0, min(promise, physical) - reserved)      (0 when the pool is nearly full)

* Every thin LV in the pool counts, ELV's or not, and thin snapshots too: a
  snapshot's blocks are shared until its origin is overwritten, and then it
  needs its own. With ``ratio == 1`` this makes the promise exact: whatever
  the volumes and snapshots write, the pool cannot overflow. LVM warns with
  the same sum ("Sum of all thin volume sizes exceeds the size of thin pool").
* ``physical`` bounds the promise by what the pool's data area still holds.
  With ``ratio == 1`` it can never be the smaller term when the virtual sum is
  honest; it matters when the ratio is above 1, where a pool that is already
  95 % written must not keep promising ``ratio`` times its size.
* A pool whose data or metadata is at or above the class's full threshold
  promises nothing: metadata exhaustion is the failure that corrupts pools.
* Subtractions are clamped at 0 in Python's unbounded integers (TL #961).

A thick class promises the VG's free extents; a raid1 volume needs one copy
per mirror, so its share is divided by the number of copies.
"""

from __future__ import annotations

import math

from csi.backend.lvm.inventory import View
from csi.backend.lvm.report import LvInfo


def round_down(n: int, unit: int) -> int:
    return n - n % unit


def thin_pool_members(view: View, vg: str, pool: str) -> list[LvInfo]:
    return [lv for lv in view.in_vg(vg) if lv.thin and lv.pool == pool]


def thin_available(
    pool_size: int,
    data_percent: float,
    metadata_percent: float,
    virtual_sum: int,
    ratio: float,
    full_threshold: float,
    reserved: int = 0,
) -> int:
    if data_percent >= full_threshold or metadata_percent >= full_threshold:
        return 0
    promise = math.floor(pool_size * ratio) - virtual_sum
    used = math.ceil(pool_size * data_percent / 100.0)
    physical = math.floor(max(0, pool_size - used) * ratio)
    return max(0, min(promise, physical) - reserved)


def thin_class_available(view: View, vg: str, pool: str, ratio: float, threshold: float, reserved: int) -> int:
    p = view.lv(vg, pool)
    if p is None or not p.thin_pool:
        return 0
    virtual = sum(lv.size for lv in thin_pool_members(view, vg, pool))
    return thin_available(p.size, p.data_percent or 0.0, p.metadata_percent or 0.0, virtual, ratio, threshold, reserved)


def thick_available(vg_free: int, extent: int, reserved: int = 0, copies: int = 1) -> int:
    free = max(0, vg_free - reserved)
    return round_down(free // max(1, copies), extent)


def pool_nearly_full(pool: LvInfo, threshold: float) -> str | None:
    """Why the pool endangers its volumes, or None."""
    if pool.data_percent is not None and pool.data_percent >= threshold:
        return f"thin pool {pool.vg}/{pool.name} data is {pool.data_percent:.1f}% full"
    if pool.metadata_percent is not None and pool.metadata_percent >= threshold:
        return f"thin pool {pool.vg}/{pool.name} metadata is {pool.metadata_percent:.1f}% full"
    if len(pool.attr) > 8 and pool.attr[8] in ("D", "M", "F"):
        return f"thin pool {pool.vg}/{pool.name} is out of space or failed (attr {pool.attr})"
    return None
