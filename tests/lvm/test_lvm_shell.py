"""The resident ``lvm shell`` against real LVM (csi.backend.lvm.shell).

Its answers must be exactly what a separate ``lvm`` answers, and they must
follow every change other processes make (a new LV, a tag, a deactivation, a
removal, a new VG on a disk that appeared after the shell started): each
command in the shell reads devices and metadata afresh.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from csi.backend.lvm import UDEV_CONTROL
from csi.backend.lvm.command import Lvm
from csi.backend.lvm.report import LV_FIELDS, REPORT_ARGS
from csi.backend.lvm.shell import LvmShell
from csi.host.runner import Runner
from tests.support.lvm import GuestVg, destroy_vg, lvm, make_vg

MISSING = "elvnosuchvg"


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Lvm, Lvm, LvmShell]]:
    """The driver's LVM client with a shell, and one without, as the driver
    sets them up in a guest without udev."""
    runner = Runner()
    shell = LvmShell(runner, str(tmp_path / "lvm-shell"))
    try:
        yield (
            Lvm(runner, udev=False, monitoring=False, shell=shell),
            Lvm(runner, udev=False, monitoring=False),
            shell,
        )
    finally:
        await runner.close(5)


def lv_names(lvs: object) -> list[str]:
    return sorted(lv.name for lv in lvs)  # type: ignore[attr-defined]


async def test_shell_answers_equal_a_separate_lvm(vg: GuestVg, pair: tuple[Lvm, Lvm, LvmShell]) -> None:
    with_shell, plain, shell = pair
    lvm("lvcreate", "-q", "-y", "-an", "-L", "8m", "-n", "sh-thick", "--addtag", "elv.test=a", vg.name)
    lvm("lvcreate", "-q", "-y", "-V", "16m", "--thinpool", vg.pool, "-n", "sh-thin", "--addtag", "x", vg.name)
    try:
        a_lvs, a_missing = await with_shell.lvs([vg.name, MISSING])
        b_lvs, b_missing = await plain.lvs([vg.name, MISSING])
        assert a_missing == b_missing == {MISSING}
        assert a_lvs == b_lvs and {"sh-thick", "sh-thin", vg.pool} <= set(lv_names(a_lvs))
        assert await with_shell.vgs([vg.name]) == await plain.vgs([vg.name])
        assert shell.pid is not None and not shell.disabled  # the shell answered, not a fallback
    finally:
        lvm("lvremove", "-q", "-y", f"{vg.name}/sh-thick", f"{vg.name}/sh-thin")


async def test_shell_sees_what_other_processes_change(vg: GuestVg, pair: tuple[Lvm, Lvm, LvmShell]) -> None:
    with_shell, _, shell = pair

    async def lv(name: str) -> object:
        lvs, _ = await with_shell.lvs([vg.name])
        return next((x for x in lvs if x.name == name), None)

    assert await lv("sh-x") is None
    pid = shell.pid
    assert pid is not None  # the shell answered, not a fallback
    lvm("lvcreate", "-q", "-y", "-L", "8m", "-n", "sh-x", vg.name)
    try:
        got = await lv("sh-x")
        assert got is not None and got.active and got.tags == ()  # type: ignore[attr-defined]
        lvm("lvchange", "-q", "--addtag", "elv.seen=1", f"{vg.name}/sh-x")
        got = await lv("sh-x")
        assert got is not None and got.tags == ("elv.seen=1",)  # type: ignore[attr-defined]
        lvm("lvchange", "-q", "-an", f"{vg.name}/sh-x")
        got = await lv("sh-x")
        assert got is not None and not got.active  # type: ignore[attr-defined]
    finally:
        lvm("lvremove", "-q", "-y", f"{vg.name}/sh-x")
    assert await lv("sh-x") is None
    assert shell.pid == pid  # one shell saw all of it

    # A VG on a disk that did not exist when the shell started.
    work = f"/tmp/elv-lvm-pvs-{vg.name}-late"
    os.makedirs(work, exist_ok=True)
    late = make_vg(f"{vg.name}late", work, (64 << 20,), pool_size="")
    try:
        found = await with_shell.vgs([late.name])
        assert [g.name for g in found] == [late.name]
    finally:
        assert not destroy_vg(late)
    assert await with_shell.vgs([late.name]) == []
    assert shell.pid == pid


async def test_reports_in_the_shell_cost_less_than_separate_lvm_processes(
    vg: GuestVg, pair: tuple[Lvm, Lvm, LvmShell]
) -> None:
    """Not a timed test: it prints the figures, and only asserts the shell was
    used. The figure that counts is `elv bench --backend lvm` (docs/lvm.md).
    The second way is the shell without the --config the driver passes:
    LVM rebuilds its context around a command that carries one."""
    with_shell, plain, shell = pair
    await with_shell.lvs([vg.name])  # start it
    pid = shell.pid
    assert pid is not None
    args = ["lvs", *REPORT_ARGS, "-o", LV_FIELDS, "--", vg.name]

    async def without_config() -> None:
        res = await shell.query(args, 60)
        assert res is not None and res.returncode == 0

    async def shell_lvs() -> None:
        await with_shell.lvs([vg.name])

    async def plain_lvs() -> None:
        await plain.lvs([vg.name])

    times = {}
    for name, call in (("shell", shell_lvs), ("shell, no --config", without_config), ("own lvm", plain_lvs)):
        start = time.monotonic()
        for _ in range(5):
            await call()
        times[name] = (time.monotonic() - start) / 5
    print("lvs, ms:", {k: round(v * 1000) for k, v in times.items()}, "udev control:", os.path.exists(UDEV_CONTROL))
    assert shell.pid == pid
