"""In-guest LVM tests: root, device-mapper, a VG on loop files, a real driver.

They fail (never skip) when device-mapper is missing: a skipped LVM layer
must never pass as green. Run them through scripts/lvm-vm.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.driver import stop_cleanly
from tests.support.fixtures import _nothing_left, base
from tests.support.lvm import GuestVg, LvmDriver, class_config, destroy_vg, make_vg, ours, wait_for, write_config
from tests.support.markers import mark_folder

__all__ = ["_nothing_left", "base"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_folder(items, Path(__file__).parent, pytest.mark.root)


@pytest.fixture(scope="session")
def dm_ready() -> None:
    if os.geteuid() != 0:
        pytest.fail("the LVM tests need root; run them through scripts/lvm-vm", pytrace=False)
    subprocess.run(["modprobe", "-a", "loop", "dm_mod", "dm_snapshot", "dm_thin_pool"], check=False)
    subprocess.run(["modprobe", "-a", "dm_mirror", "dm_raid", "raid1"], check=False, capture_output=True)
    if not os.path.exists("/dev/mapper/control") and not os.path.exists("/sys/module/dm_mod"):
        pytest.fail("this kernel has no device-mapper: run the LVM tests inside the VM (scripts/lvm-vm)", pytrace=False)


@pytest.fixture(scope="session")
def vg(dm_ready: None) -> Iterator[GuestVg]:
    # scripts/lvm-vm runs two pytest processes at once, each on its own VG.
    name = os.environ.get("ELV_TEST_VG", "elvtest")
    work = f"/tmp/elv-lvm-pvs-{name}"
    os.makedirs(work, exist_ok=True)
    v = make_vg(name, work)
    try:
        yield v
    finally:
        problems = destroy_vg(v)
        assert not problems, problems


@pytest.fixture(autouse=True)
def _no_lv_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test that used the VG: no LV of ELV's (read with lvs) that
    was not there before it. Tests of the module that keeps one driver for
    all of them (the fuzz test: its accepted creates stay until it ends) are
    checked when that driver's fixture ends instead."""
    shared = "lvm_fuzz_driver" in request.fixturenames
    vg: GuestVg | None = request.getfixturevalue("vg") if "vg" in request.fixturenames and not shared else None
    before = set(ours(vg)) if vg else set()
    yield
    if vg is not None:
        left = sorted(set(ours(vg)) - before)
        if left:
            pytest.fail(f"the test left LVs of ELV's behind: {left}", pytrace=False)


@pytest.fixture
def driver(base: str, vg: GuestVg) -> Iterator[LvmDriver]:
    cfg = write_config(os.path.join(base, "lvm.toml"), class_config(vg))
    d = LvmDriver(base, ["--lvm-config", cfg]).start()
    try:
        yield d
        # Every test deletes what it made; the wiper then removes the quarantined LVs.
        wait_for(lambda: not ours(vg), 120, "the wiper to finish")
    finally:
        stop_cleanly(d, base)
