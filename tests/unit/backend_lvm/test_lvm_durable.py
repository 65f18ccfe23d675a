"""Every LVM change is flushed to the PVs before it counts.

LVM writes its metadata with O_DIRECT and returns without a cache flush; a
power cut right after an acknowledged delete (``lvchange --addtag elv.wipe``)
brought the deleted snapshot back in tests/lvm/test_power_loss_lvm.py (seed
1708783382). csi.backend.lvm.command.Lvm now fsyncs the configured VGs' PVs
after every change."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from csi.backend.lvm.command import Lvm
from csi.errors import CommandError, Unavailable
from tests.support.fakes import FakeRunner

PVS = [
    {"pv_name": "/dev/vdb", "vg_name": "vg0"},
    {"pv_name": "/dev/vdc", "vg_name": "vg0"},
    {"pv_name": "/dev/vdd", "vg_name": "other"},
    {"pv_name": "/dev/vde", "vg_name": ""},
    {"pv_name": "[unknown]", "vg_name": "vg0"},  # a missing PV
]


class Disks:
    """The PVs as the fake LVM reports them, and the order of commands and flushes."""

    def __init__(self) -> None:
        self.pvs = list(PVS)
        self.events: list[str] = []
        self.fail_sync = 0

    def handle(self, args: tuple[str, ...]) -> tuple[int, bytes, bytes]:
        self.events.append(f"lvm {args[1]}")
        if args[1] == "pvs":
            return 0, json.dumps({"report": [{"pv": self.pvs}]}).encode(), b""
        if args[1] == "lvremove" and "vg0/missing" in args:
            raise CommandError(args, 5, b"", b"  Failed to find logical volume\n")
        return 0, b"", b""

    def sync(self, paths: Sequence[str]) -> None:
        if self.fail_sync:
            self.fail_sync -= 1
            raise FileNotFoundError(2, "No such file or directory", paths[0])
        self.events.append("flush " + " ".join(paths))


def lvm(disks: Disks) -> Lvm:
    runner: Any = FakeRunner(handler=disks.handle)  # a Runner in all but name, as in fake_lvm.py
    return Lvm(runner, udev=False, vgs=["vg0"], sync=disks.sync)


async def test_a_change_is_flushed_to_its_vgs_pvs_before_it_returns() -> None:
    disks = Disks()
    l = lvm(disks)  # noqa: E741
    await l.change("lvchange", "--addtag", "elv.wipe", "vg0/elv-s-thick-1")
    await l.change("lvremove", "-y", "vg0/elv-q-1")
    # The PV list is read once; only vg0's PVs are flushed, each change's own.
    assert disks.events == [
        "lvm lvchange",
        "lvm pvs",
        "flush /dev/vdb /dev/vdc",
        "lvm lvremove",
        "flush /dev/vdb /dev/vdc",
    ]


async def test_a_query_flushes_nothing_and_a_failed_change_reports_its_error() -> None:
    disks = Disks()
    l = lvm(disks)  # noqa: E741
    await l.query("lvs")
    with pytest.raises(CommandError):
        await l.change("lvremove", "-y", "vg0/missing")
    assert disks.events == ["lvm lvs", "lvm lvremove"]


async def test_the_pv_list_is_read_again_after_the_vg_changes_or_a_pv_is_gone() -> None:
    disks = Disks()
    l = lvm(disks)  # noqa: E741
    await l.change("lvcreate", "-n", "a", "vg0")
    disks.pvs.append({"pv_name": "/dev/vdf", "vg_name": "vg0"})
    await l.change("vgextend", "vg0", "/dev/vdf")
    disks.fail_sync = 1
    await l.change("lvcreate", "-n", "b", "vg0")
    assert disks.events == [
        "lvm lvcreate",
        "lvm pvs",
        "flush /dev/vdb /dev/vdc",
        "lvm vgextend",
        "lvm pvs",
        "flush /dev/vdb /dev/vdc /dev/vdf",
        "lvm lvcreate",
        "lvm pvs",
        "flush /dev/vdb /dev/vdc /dev/vdf",
    ]
    disks.fail_sync = 2
    with pytest.raises(Unavailable, match="cannot flush the write cache of the PVs of vg0"):
        await l.change("lvcreate", "-n", "c", "vg0")


def test_the_backend_flushes_the_configured_vgs() -> None:
    from csi.backend.lvm import build
    from csi.config import Config

    runner: Any = FakeRunner()
    config = Config(endpoint="unix:///x.sock", node_id="n", backend="lvm", lvm_vg="vg7", lvm_thin_pool="pool0")
    backend = build(config, runner)
    assert backend.store.lvm.flush_vgs == ("vg7",)
