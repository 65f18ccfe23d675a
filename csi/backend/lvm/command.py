"""The only place ELV runs ``lvm``: through the shared runner, as argv lists.

Every call carries a ``--config`` string built once from the settings:

* without udev (a container), ``activation{udev_sync=0 udev_rules=0
  verify_udev_operations=1}`` makes LVM create the /dev nodes itself instead
  of waiting for a udev cookie forever (lvm-vm notes: lvcreate hung for good
  on a stale /run/udev/control), and ``devices{obtain_device_list_from_udev=0}``
  makes it scan /dev instead of asking udev's database;
* ``activation{monitoring=0}`` where no dmeventd should be started.

Reports are JSON in bytes. Queries are read-only, so the runner may kill them
when their RPC is cancelled (TopoLVM #1163); changes are never killed half-way.
Queries go to a resident ``lvm shell`` when there is one (csi.backend.lvm.shell):
starting ``lvm`` costs more than most reports. Changes go to a second one,
never killed half-way, when it can take them (csi.backend.lvm.changes).

Every change is made durable before it counts: LVM writes its metadata with
O_DIRECT and returns without flushing the disks' write caches, so a power
cut right after an acknowledged ``lvchange --addtag elv.wipe`` brought the
deleted snapshot back (tests/lvm/test_power_loss_lvm.py, seed 1708783382: the
metadata write reached the log only after the next flush). After each change
the PVs of the configured VGs are fsynced, which sends the devices a cache
flush; the PV list is read once and again after a command that changes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence

from csi.backend.lvm import report
from csi.backend.lvm.changes import ChangeShell
from csi.backend.lvm.report import LvInfo, VgInfo
from csi.backend.lvm.shell import LvmShell
from csi.errors import CommandError, Unavailable
from csi.host.runner import Result, Runner

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 60.0
#: Commands after which the PVs of a VG may be others.
PV_CHANGES = frozenset({"vgcreate", "vgextend", "vgreduce", "vgremove", "pvcreate", "pvremove", "pvmove"})


def fsync_devices(paths: Sequence[str]) -> None:
    """fsync each block device: the kernel sends it a cache flush (blkdev_fsync)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def config_string(*, udev: bool, monitoring: bool | None) -> str:
    activation = []
    if not udev:
        activation += ["udev_sync=0", "udev_rules=0", "verify_udev_operations=1"]
    if monitoring is not None:
        activation.append(f"monitoring={int(monitoring)}")
    parts = []
    if activation:
        parts.append("activation{" + " ".join(activation) + "}")
    if not udev:
        parts.append("devices{obtain_device_list_from_udev=0}")
    return " ".join(parts)


class Lvm:
    def __init__(
        self,
        runner: Runner,
        *,
        udev: bool,
        monitoring: bool | None = None,
        timeout: float = 120.0,
        shell: LvmShell | None = None,
        changes: ChangeShell | None = None,
        vgs: Sequence[str] = (),
        sync: Callable[[Sequence[str]], None] = fsync_devices,
    ) -> None:
        self._run = runner
        self._shell = shell
        self._changes = changes
        self.udev = udev
        self.config = config_string(udev=udev, monitoring=monitoring)
        self.timeout = timeout
        self.flush_vgs = tuple(vgs)  # whose PVs every change flushes
        self._sync = sync
        self._pvs: list[str] | None = None

    def argv(self, command: str, args: Sequence[str]) -> list[str]:
        argv = ["lvm", command]
        if self.config:
            argv += ["--config", self.config]
        return argv + list(args)

    async def change(self, command: str, *args: str, timeout: float | None = None) -> Result:
        """Run a command that changes LVM state (never killed on cancel), and
        make what it wrote durable before anyone is told it is done."""
        argv, limit = self.argv(command, args), timeout or self.timeout
        res = await self._changes.change(argv[1:], limit) if self._changes is not None else None
        if res is None:
            res = await self._run.run(argv, timeout=limit, mutating=True)
        elif res.returncode != 0:
            raise CommandError(res.argv, res.returncode, res.stdout, res.stderr)
        if command in PV_CHANGES:
            self._pvs = None
        await self.flush()
        return res

    async def flush(self) -> None:
        """Flush the write caches of the configured VGs' PVs."""
        if not self.flush_vgs:
            return
        for attempt in (1, 2):
            if self._pvs is None:
                self._pvs = await self.pvs(self.flush_vgs)
            try:
                await asyncio.to_thread(self._sync, self._pvs)
                return
            except OSError as e:
                self._pvs = None  # a PV renamed or gone: read the list again, once
                if attempt == 2:
                    raise Unavailable(
                        f"cannot flush the write cache of the PVs of {', '.join(self.flush_vgs)}: {e}"
                    ) from e

    async def pvs(self, vgs: Sequence[str]) -> list[str]:
        """The device nodes of these VGs' PVs."""
        res = await self.query("pvs", *report.REPORT_ARGS, "-o", "pv_name,vg_name")
        pvs = report.parse_pvs(res.text) if res.stdout.strip() else []
        # A missing PV is reported as "[unknown]": there is nothing to flush.
        return sorted({pv for pv, vg in pvs if vg in vgs and pv.startswith("/")})

    async def query(self, command: str, *args: str, ok_codes: Sequence[int] = (0,)) -> Result:
        argv, timeout = self.argv(command, args), min(self.timeout, QUERY_TIMEOUT)
        # The same argv in the shell: LVM rebuilds its context around a
        # command that carries --config, which costs a little (about 25 ms of
        # 110 under emulation, tests/lvm/test_lvm_shell.py) but keeps every
        # report reading exactly what a separate lvm would.
        res = await self._shell.query(argv[1:], timeout) if self._shell is not None else None
        if res is None:
            return await self._run.run(argv, timeout=timeout, mutating=False, ok_codes=ok_codes)
        if res.returncode not in ok_codes:
            raise CommandError(res.argv, res.returncode, res.stdout, res.stderr)
        return res

    async def lvs(self, vgs: Sequence[str]) -> tuple[list[LvInfo], set[str]]:
        """Every LV of these VGs, and the set of VGs that do not exist.

        LVM reports on the VGs it finds and exits 5 for a missing one; the
        report still holds the rest, so one missing VG never hides the others.
        """
        res = await self.query("lvs", *report.REPORT_ARGS, "-o", report.LV_FIELDS, "--", *vgs, ok_codes=(0, 5))
        lvs = report.parse_lvs(res.text) if res.stdout.strip() else []
        missing: set[str] = set()
        if res.returncode == 5:
            err = CommandError(res.argv, res.returncode, res.stdout, res.stderr)
            if not report.not_found(err):
                raise err
            missing = report.missing_vgs(err, vgs, {lv.vg for lv in lvs})
        return lvs, missing

    async def vgs(self, vgs: Sequence[str]) -> list[VgInfo]:
        res = await self.query("vgs", *report.REPORT_ARGS, "-o", report.VG_FIELDS, "--", *vgs, ok_codes=(0, 5))
        if res.returncode == 5:
            err = CommandError(res.argv, res.returncode, res.stdout, res.stderr)
            if not report.not_found(err):
                raise err
        return report.parse_vgs(res.text) if res.stdout.strip() else []
