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

from csi.backend.lvm import UDEV_CONTROL, report
from csi.backend.lvm.changes import ChangeShell
from csi.backend.lvm.command import Lvm
from csi.backend.lvm.report import LV_FIELDS, REPORT_ARGS
from csi.backend.lvm.shell import LvmShell
from csi.errors import CommandError
from csi.host.runner import Runner
from tests.support.lvm import GuestVg, destroy_vg, lv, lvm, make_vg

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


# -- changes, in the second shell (csi.backend.lvm.changes) ---------------------


@pytest.fixture
async def changer(tmp_path: Path) -> AsyncIterator[tuple[Lvm, ChangeShell]]:
    """The driver's LVM client whose changes go to the shell for changes."""
    (tmp_path / "journal").mkdir()
    runner = Runner(journal_dir=str(tmp_path / "journal"))
    changes = ChangeShell(runner, str(tmp_path / "lvm-changes"))
    try:
        yield Lvm(runner, udev=False, monitoring=False, changes=changes), changes
    finally:
        await runner.close(5)


def seen(vg: GuestVg, name: str) -> tuple[bool, int, list[str]] | None:
    """(active, size, tags) of an LV, read by the test's own lvm."""
    row = lv(vg.name, name)
    if row is None:
        return None
    return row["lv_attr"][4] == "a", int(row["lv_size"]), sorted(t for t in row["lv_tags"].split(",") if t)


async def test_changes_in_the_shell_leave_what_a_separate_lvm_leaves(
    vg: GuestVg, changer: tuple[Lvm, ChangeShell]
) -> None:
    """Each change the driver makes, made in the shell, read back by a
    separate lvm; all of them in one shell, none run on its own."""
    client, changes = changer
    path = f"{vg.name}/ch-a"
    try:
        await client.change(
            "lvcreate", "-n", "ch-a", "-L", "8m", "-W", "y", "-Z", "y", "-y", "--addtag", "elv.x=1", vg.name
        )
        pid = changes.pid
        assert pid is not None and seen(vg, "ch-a") == (True, 8 << 20, ["elv.x=1"])
        await client.change("lvchange", "--addtag", "elv.y=2", "--deltag", "elv.x=1", path)
        assert seen(vg, "ch-a") == (True, 8 << 20, ["elv.y=2"])
        await client.change("lvchange", "-an", "-y", path)
        assert seen(vg, "ch-a") == (False, 8 << 20, ["elv.y=2"])
        await client.change("lvchange", "-ay", "-K", "-y", path)
        assert seen(vg, "ch-a") == (True, 8 << 20, ["elv.y=2"])
        await client.change("lvextend", "-y", "-L", f"{16 << 20}b", path)
        assert seen(vg, "ch-a") == (True, 16 << 20, ["elv.y=2"])
        await client.change("lvcreate", "-n", "ch-t", "-V", "16m", "--thinpool", vg.pool, "-y", vg.name)
        await client.change("lvcreate", "-s", "-n", "ch-ts", "-y", f"{vg.name}/ch-t")
        assert seen(vg, "ch-ts") is not None
        await client.change("lvremove", "-y", path, f"{vg.name}/ch-ts", f"{vg.name}/ch-t")
        assert all(seen(vg, n) is None for n in ("ch-a", "ch-t", "ch-ts"))
        assert changes.pid == pid and not changes.disabled
    finally:
        lvm("lvremove", "-q", "-y", path, f"{vg.name}/ch-ts", f"{vg.name}/ch-t", check=False)


async def test_a_change_in_the_shell_fails_as_a_separate_lvm_does(
    vg: GuestVg, changer: tuple[Lvm, ChangeShell]
) -> None:
    """The driver reads a failed change's messages (an open LV, a missing
    one): the shell's must be the ones a separate lvm prints."""
    client, changes = changer
    lvm("lvcreate", "-q", "-y", "-L", "8m", "-n", "ch-open", vg.name)
    fd = os.open(f"/dev/{vg.name}/ch-open", os.O_RDONLY)
    try:
        with pytest.raises(CommandError) as e:
            await client.change("lvchange", "-an", "-y", f"{vg.name}/ch-open")
        assert report.still_open(e.value) and e.value.returncode == 5
        assert changes.pid is not None  # the shell answered
        with pytest.raises(CommandError) as e:
            await client.change("lvremove", "-y", f"{vg.name}/ch-nosuch")
        assert report.not_found(e.value)
        assert seen(vg, "ch-open") == (True, 8 << 20, [])
    finally:
        os.close(fd)
        lvm("lvremove", "-q", "-y", f"{vg.name}/ch-open")


async def test_changes_in_the_shell_cost_less_than_separate_lvm_processes(
    vg: GuestVg, changer: tuple[Lvm, ChangeShell]
) -> None:
    """Not a timed test: it prints the figures (docs/lvm.md quotes them) and
    asserts only that the shell made the changes."""
    client, changes = changer
    runner = Runner()
    plain = Lvm(runner, udev=False, monitoring=False)
    lvm("lvcreate", "-q", "-y", "-L", "8m", "-n", "ch-tag", vg.name)
    try:
        times = {}
        for name, who in (("shell", client), ("own lvm", plain)):
            start = time.monotonic()
            for i in range(5):
                await who.change("lvchange", "--addtag", f"elv.n={name[0]}{i}", f"{vg.name}/ch-tag")
            times[name] = (time.monotonic() - start) / 5
        print("lvchange --addtag, ms:", {k: round(v * 1000) for k, v in times.items()})
        assert changes.pid is not None and len(seen(vg, "ch-tag")[2]) == 10  # type: ignore[index]
    finally:
        await runner.close(5)
        lvm("lvremove", "-q", "-y", f"{vg.name}/ch-tag")
