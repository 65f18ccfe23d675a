"""A short-lived view of the configured VGs: one ``lvs`` call answers a burst.

Every change this process makes drops the view, and every RPC that changes
something asks for a fresh one before it decides, so repeats and retries
always act on the real state. Read-only RPCs (ListVolumes, GetCapacity, the
node's lookups within one NodeStage) may share a view up to ``ttl`` old: a
single ``lvs`` costs about 0.7 s under emulation and 0.1-0.4 s on metal
(TopoLVM #1221 counted 40 calls a minute from polling alone).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from csi.backend.lvm.command import Lvm
from csi.backend.lvm.report import LvInfo, VgInfo


@dataclass(frozen=True)
class VgSpace:
    name: str
    size: int
    free: int
    extent_size: int


@dataclass(frozen=True)
class View:
    lvs: dict[tuple[str, str], LvInfo]
    vgs: dict[str, VgSpace]
    missing: frozenset[str]
    taken: float
    generation: int = 0

    def lv(self, vg: str, name: str) -> LvInfo | None:
        return self.lvs.get((vg, name))

    def in_vg(self, vg: str) -> list[LvInfo]:
        return [lv for (g, _), lv in sorted(self.lvs.items()) if g == vg]

    def all(self) -> Iterable[LvInfo]:
        return (self.lvs[k] for k in sorted(self.lvs))


#: The view the current RPC (one asyncio task) loaded for its decisions, with
#: the task it belongs to: a new task inherits its parent's context, and must
#: not inherit the view (the server's RPC tasks all descend from startup's).
_task_view: contextvars.ContextVar[tuple[int, View] | None] = contextvars.ContextVar("elv_lvm_view", default=None)


def _task_id() -> int:
    task = asyncio.current_task()
    return id(task) if task is not None else 0


def _mine() -> View | None:
    held = _task_view.get()
    return held[1] if held is not None and held[0] == _task_id() else None


def _keep(v: View) -> None:
    _task_view.set((_task_id(), v))


class Inventory:
    def __init__(self, lvm: Lvm, vgs: list[str], ttl: float = 1.0) -> None:
        self._lvm = lvm
        self._vgs = vgs
        self._ttl = ttl
        self._view: View | None = None
        self._generation = 0

    def invalidate(self) -> None:
        """Forget every view: this process just changed LVM."""
        self._generation += 1
        self._view = None

    @property
    def generation(self) -> int:
        return self._generation

    def apply(self, view: View, lv: LvInfo) -> View:
        """Record a change this process just made to one LV (tags, activation)
        without asking LVM again: the patched view becomes the current one, and
        every other task's view is outdated by the new generation."""
        self._generation += 1
        lvs = dict(view.lvs)
        lvs[(lv.vg, lv.name)] = lv
        v = replace(view, lvs=lvs, generation=self._generation)
        self._view = v
        _keep(v)
        return v

    @staticmethod
    def forget_task_view() -> None:
        _task_view.set(None)

    async def view(self, fresh: bool = False, reload: bool = False) -> View:
        """A view of the VGs.

        ``fresh``: loaded during the current RPC (task) and after this
        process's last change, so a decision always rests on what LVM says
        now; the steps of one RPC share it until one of them changes LVM.
        Otherwise: any view up to ``ttl`` old. ``reload``: read LVM now, for
        facts that change outside LVM (an LV is open while it is mounted).
        """
        if not reload:
            # This RPC's own view, loaded after this process's last change, is
            # what ``fresh`` asks for, so it also does for the weaker ask. (Under
            # emulation one lvs outlasts the ttl, and without this an RPC's
            # second lookup ran a second lvs.)
            v = _mine()
            if v is not None and v.generation == self._generation:
                return v
            v = self._view
            if not fresh and v is not None and time.monotonic() - v.taken < self._ttl:
                return v
        generation = self._generation
        v = await self._load(generation)
        if generation == self._generation:
            # Only keep it if nothing changed while it was being read.
            self._view = v
            _keep(v)
        return v

    async def _load(self, generation: int) -> View:
        taken = time.monotonic()
        lvs, missing = await self._lvm.lvs(self._vgs)
        space: dict[str, VgSpace] = {}
        for lv in lvs:
            if lv.vg not in space and lv.vg_size is not None and lv.vg_free is not None and lv.vg_extent_size:
                space[lv.vg] = VgSpace(lv.vg, lv.vg_size, lv.vg_free, lv.vg_extent_size)
        empty = [vg for vg in self._vgs if vg not in space and vg not in missing]
        if empty:
            # A VG without LVs has no rows in lvs; ask vgs for its space.
            found: list[VgInfo] = await self._lvm.vgs(empty)
            for g in found:
                space[g.name] = VgSpace(g.name, g.size, g.free, g.extent_size)
            missing = missing | {vg for vg in empty if vg not in space}
        return View(
            lvs={(lv.vg, lv.name): lv for lv in lvs if not lv.hidden},
            vgs=space,
            missing=frozenset(missing),
            taken=taken,
            generation=generation,
        )
