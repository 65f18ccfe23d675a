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
  Nor does a pool that LVM reports out of space, read-only or failed
  (lv_attr D/M/F, lv_health_status), whatever its percentages say.
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
    if p is None or not p.thin_pool or pool_condition(p, threshold) is not None:
        return 0
    virtual = sum(lv.size for lv in thin_pool_members(view, vg, pool))
    return thin_available(p.size, p.data_percent or 0.0, p.metadata_percent or 0.0, virtual, ratio, threshold, reserved)


def copy_grain(pool_chunk: int) -> int:
    """The step a sparse copy into this pool tests for zeros: its chunk (the
    unit it maps), between 64 KiB and the copy's 4 MiB buffer."""
    return min(max(pool_chunk, 64 * 1024), 4 * 1024 * 1024)


def copy_bound(src: LvInfo, size: int, grain: int) -> int:
    """The most a block copy of ``size`` bytes of ``src`` maps in a thin pool:
    a thin source's mapped blocks (lvs rounds its data% to 0.01, hence the
    margin), rounded up to the grain, else all of it (thick: nothing says
    which of its blocks hold data)."""
    if src.thin and src.data_percent is not None:
        mapped = math.ceil(src.size * (src.data_percent + 0.01) / 100.0)
        return min(size, -(-mapped // grain) * grain)
    return size


def pool_room(pool: LvInfo, threshold: float) -> int:
    """Bytes the pool can still map before its data reaches ``threshold`` percent."""
    used = math.ceil(pool.size * (pool.data_percent or 0.0) / 100.0)
    return max(0, math.floor(pool.size * threshold / 100.0) - used)


def thick_available(vg_free: int, extent: int, reserved: int = 0, copies: int = 1) -> int:
    free = max(0, vg_free - reserved)
    return round_down(free // max(1, copies), extent)


#: lv_health_status of a thin pool that can no longer serve every write (lvs(8)).
_POOL_HEALTH = {
    "out_of_data": "is out of data space",
    "metadata_read_only": "has read-only metadata (metadata full or damaged)",
    "failed": "has failed",
}
#: lv_attr's ninth character (volume health) for a thin pool: D out of data space,
#: M metadata read only, F failed.
_POOL_ATTR = {"D": "out_of_data", "M": "metadata_read_only", "F": "failed"}


def _percent(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f}%"


def pool_condition(pool: LvInfo, threshold: float) -> str | None:
    """Why the pool endangers its thin volumes' writes, or None: the
    VolumeCondition message of every volume in it (and the reason the class
    then promises nothing).

    A full pool is the failure a user meets as a write error, so the message
    names the figures and what a write does next: with the default
    ``--errorwhenfull n`` the kernel queues writes that need new blocks (up to
    dm-thin's ``no_space_timeout``, 60 s by default) and then fails them with
    ENOSPC; with ``--errorwhenfull y`` they fail with ENOSPC at once."""
    figures = f"data {_percent(pool.data_percent)}, metadata {_percent(pool.metadata_percent)}"
    if pool.when_full == "error":
        then = "writes that need new blocks fail at once with ENOSPC"
    else:
        then = "writes that need new blocks block (up to dm-thin's no_space_timeout, 60 s by default), then fail with ENOSPC"
    name = f"thin pool {pool.vg}/{pool.name}"
    state = pool.health if pool.health in _POOL_HEALTH else ""
    if not state and len(pool.attr) > 8:
        state = _POOL_ATTR.get(pool.attr[8], "")
    if state == "out_of_data":
        return f"{name} {_POOL_HEALTH[state]} ({figures}): {then}; free space in the pool or extend it"
    if state:
        return f"{name} {_POOL_HEALTH[state]} ({figures}, lv_attr {pool.attr}): writes that need new blocks fail"
    data = pool.data_percent is not None and pool.data_percent >= threshold
    meta = pool.metadata_percent is not None and pool.metadata_percent >= threshold
    if data or meta:
        which = "data and metadata" if data and meta else "data" if data else "metadata"
        return (
            f"{name} is nearly full ({figures}; {which} at or over the {threshold:g}% threshold): once it fills, {then}"
        )
    return None
