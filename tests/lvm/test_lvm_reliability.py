"""The reliability suite's cases that depend on the backend, on real LVM:
a retry storm of identical creates, a simulated reboot, and a full VG or pool.
(Crashes are tests/lvm/test_lvm_crash.py; tenant isolation is the wipe test
in test_lvm_data.py; hostile input is checked before any backend is called.)"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import grpc
import pytest

from csi.model import DEVICE_CLASS as CLASS
from csi.v1 import csi_pb2
from tests.support import observe
from tests.support.lvm import GuestVg, LvmDriver, MiB, lvm, lvs, ours
from tests.support.rpc import block_cap, code_of, mount_cap


@pytest.mark.parametrize("cls", ["thick", "thin"])
def test_identical_creates_make_one_lv(driver: LvmDriver, vg: GuestVg, cls: str) -> None:
    """16 concurrent CreateVolume calls with one name (a provisioner's retry
    storm) make exactly one LV, and every caller gets its ID."""
    results: list[object] = []

    def create() -> None:
        try:
            results.append(driver.create("storm-" + cls, 64 * MiB, parameters={CLASS: cls}))
        except grpc.RpcError as e:
            results.append(e.code())

    threads = [threading.Thread(target=create) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    ids = set(results)
    assert len(results) == 16 and len(ids) == 1, results
    vid = ids.pop()
    assert isinstance(vid, str)
    assert ours(vg) == ["elv-" + vid], ours(vg)
    driver.delete(vid)


def test_reboot_restages_with_data(driver: LvmDriver, vg: GuestVg) -> None:
    """A reboot leaves every LV inactive and every mount gone. The driver
    restarts and kubelet restages and republishes: the data is all there,
    and nothing is formatted again."""
    vols = [
        ("rb-thick", "thick", "ext4", 64 * MiB),
        ("rb-thin", "thin", "xfs", 320 * MiB),
        ("rb-blk", "thin", "", 32 * MiB),
    ]
    made = []
    for name, cls, fs, size in vols:
        cap = mount_cap(fs) if fs else block_cap()
        vid = driver.create(name, size, cap, parameters={CLASS: cls})
        st, pub = driver.path("st", name), driver.path("pub", name)
        driver.stage(vid, st, cap)
        driver.publish(vid, st, pub, cap)
        if fs:
            with open(os.path.join(pub, "data"), "w") as f:
                f.write(f"kept {name}")
                f.flush()
                os.fsync(f.fileno())
        else:
            with open(pub, "r+b") as f:
                f.write(b"kept block " + name.encode())
                f.flush()
                os.fsync(f.fileno())
        made.append((vid, name, cap, fs, st, pub))
    # The reboot: the driver dies, the mounts go, the LVs are no longer active.
    driver.kill()
    for m in sorted(observe.mounts_under(driver.base), key=lambda m: -len(m.mount_point)):
        subprocess.run(["umount", m.mount_point], check=True)
    lvm("vgchange", "-an", vg.name)
    assert all(r["lv_attr"][4] == "-" for r in lvs(vg.name)), "every LV is inactive after the 'reboot'"
    driver.start()
    for vid, name, cap, fs, st, pub in made:
        driver.stage(vid, st, cap)
        driver.publish(vid, st, pub, cap)
        if fs:
            with open(os.path.join(pub, "data")) as f:
                assert f.read() == f"kept {name}"
        else:
            with open(pub, "rb") as f:
                assert f.read(len(b"kept block ") + len(name)) == b"kept block " + name.encode()
    assert "formatted " not in driver.log().split("serving CSI")[-1], "a restage after the reboot formatted a volume"
    for vid, _, _, _, st, pub in made:
        driver.unpublish(vid, pub)
        driver.unstage(vid, st)
        driver.delete(vid)
    # The thin pool stays usable (vgchange -an deactivated it too): a new volume works.
    vid = driver.create("rb-after", 32 * MiB, parameters={CLASS: "thin"})
    driver.delete(vid)


def capacity(driver: LvmDriver, cls: str) -> int:
    time.sleep(1.1)  # past the read-only report cache
    req = csi_pb2.GetCapacityRequest(parameters={CLASS: cls})
    return int(driver.controller.GetCapacity(req).available_capacity)


def test_full_thin_pool_then_space_freed(driver: LvmDriver, vg: GuestVg) -> None:
    """Beyond what the thin class can promise: RESOURCE_EXHAUSTED and no LV
    left half-made; once a volume is deleted, the same request succeeds."""
    free = capacity(driver, "thin")
    assert free > 128 * MiB
    hog = driver.create("hog", free - 64 * MiB, parameters={CLASS: "thin"})
    before = ours(vg)
    assert code_of(driver.create, "wants", 128 * MiB, parameters={CLASS: "thin"}) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ours(vg) == before, "a refused create left an LV behind"
    driver.delete(hog)
    vid = driver.create("wants", 128 * MiB, parameters={CLASS: "thin"})
    assert capacity(driver, "thin") == free - 128 * MiB
    driver.delete(vid)


def test_full_vg_refuses_thick_volumes(driver: LvmDriver, vg: GuestVg) -> None:
    """More than the VG's free extents: RESOURCE_EXHAUSTED, nothing left
    behind, and a volume that fits is then made."""
    free = capacity(driver, "thick")
    before = ours(vg)
    assert code_of(driver.create, "huge", free + 64 * MiB, parameters={CLASS: "thick"}) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert ours(vg) == before
    vid = driver.create("fits", 64 * MiB, parameters={CLASS: "thick"})
    driver.delete(vid)
