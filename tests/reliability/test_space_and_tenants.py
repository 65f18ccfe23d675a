"""A full pool, a previous tenant's data, and a simulated reboot."""

from __future__ import annotations

import os
import subprocess

import grpc

from csi.v1 import csi_pb2
from tests.support import observe
from tests.support.driver import Driver, MiB, leftovers
from tests.support.rpc import block_cap, code_of, mount_cap

PATTERN = b"TENANT-A-SECRET!" * 4096  # 64 KiB


def small_pool(base: str, size_mib: int) -> str:
    """Mount a tiny ext4 filesystem at base/pool, so the pool can really fill up."""
    img, pool = os.path.join(base, "pool.img"), os.path.join(base, "pool")
    with open(img, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", img], check=True)
    os.makedirs(pool)
    subprocess.run(["mount", "-o", "loop", img, pool], check=True)
    return pool


def unmount_pool(base: str) -> None:
    """Unmount the small pool (its loop device autoclears). Tolerant: after a
    failure the scratch fixture's force cleanup handles what is still busy."""
    pool = os.path.join(base, "pool")
    subprocess.run(["umount", pool], check=False, capture_output=True)


def test_out_of_space_is_clean_and_recovers(base: str) -> None:
    small_pool(base, 128)
    d = Driver(base).start()
    try:
        thick = {"elv.csi.dev/provisioning": "thick"}
        made = [d.create(f"fill-{i}", 32 * MiB, parameters=thick) for i in range(3)]
        req = csi_pb2.CreateVolumeRequest(
            name="one-too-many",
            volume_capabilities=[mount_cap()],
            capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
            parameters=thick,
        )
        assert code_of(d.controller.CreateVolume, req) == grpc.StatusCode.RESOURCE_EXHAUSTED
        expected = sorted(f"{v}.{ext}" for v in made for ext in ("img", "json"))
        assert sorted(os.listdir(os.path.join(d.pool, "volumes"))) == expected, "nothing half-made is left"
        assert os.listdir(os.path.join(d.pool, "tmp")) == []
        # Growing past the pool and snapshotting into a full pool fail the same clean way.
        grow = csi_pb2.ControllerExpandVolumeRequest(
            volume_id=made[0], capacity_range=csi_pb2.CapacityRange(required_bytes=96 * MiB)
        )
        assert code_of(d.controller.ControllerExpandVolume, grow) == grpc.StatusCode.RESOURCE_EXHAUSTED
        snap = csi_pb2.CreateSnapshotRequest(name="no-room", source_volume_id=made[0])
        assert code_of(d.controller.CreateSnapshot, snap) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert os.listdir(os.path.join(d.pool, "snapshots")) == []
        # Once space is freed, the same request works.
        d.delete(made.pop())
        d.delete(made.pop())
        made.append(d.controller.CreateVolume(req).volume.volume_id)
        for v in made:
            d.delete(v)
    finally:
        assert d.stop() == 0
        unmount_pool(base)
    assert leftovers(base) == []


def test_sparse_volume_filling_a_full_pool(base: str) -> None:
    """Overcommitted sparse volumes can run the pool dry; writes then fail in
    the volume, and the driver keeps serving and cleaning up."""
    small_pool(base, 96)
    d = Driver(base, "--overprovision-ratio", "4").start()
    try:
        vid = d.create("big", 256 * MiB, block_cap())
        staging, target = d.path("st"), d.path("t", "dev")
        os.makedirs(os.path.dirname(target))
        d.stage(vid, staging, block_cap())
        d.publish(vid, staging, target, block_cap())
        fd = os.open(target, os.O_WRONLY | os.O_DIRECT)
        import mmap

        buf = mmap.mmap(-1, MiB)
        buf.write(b"x" * MiB)
        failed = False
        try:
            for i in range(200):
                os.pwrite(fd, buf, i * MiB)
        except OSError:
            failed = True
        finally:
            os.close(fd)
        assert failed, "writes past the pool's space must fail"
        assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value
        cap = d.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
        assert cap == 0, "a physically full pool promises nothing, whatever the ratio"
        d.unpublish(vid, target)
        d.unstage(vid, staging)
        d.delete(vid)
    finally:
        assert d.stop() == 0
        unmount_pool(base)
    assert leftovers(base) == []


def test_new_volume_never_shows_old_tenant_data(driver: Driver) -> None:
    def fill_and_delete(name: str, thick: bool) -> None:
        params = {"elv.csi.dev/provisioning": "thick"} if thick else {}
        vid = driver.create(name, 16 * MiB, block_cap(), parameters=params)
        staging, target = driver.path("st", name), driver.path("t", name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        driver.stage(vid, staging, block_cap())
        driver.publish(vid, staging, target, block_cap())
        with open(target, "r+b") as f:
            for _ in range(0, 16 * MiB, len(PATTERN)):
                f.write(PATTERN)
            f.flush()
            os.fsync(f.fileno())
        driver.unpublish(vid, target)
        driver.unstage(vid, staging)
        driver.delete(vid)

    def read_all(name: str, thick: bool) -> bytes:
        params = {"elv.csi.dev/provisioning": "thick"} if thick else {}
        vid = driver.create(name, 16 * MiB, block_cap(), parameters=params)
        staging, target = driver.path("st", name), driver.path("t", name)
        driver.stage(vid, staging, block_cap())
        driver.publish(vid, staging, target, block_cap())
        with open(target, "rb") as f:
            data = f.read()
        driver.unpublish(vid, target)
        driver.unstage(vid, staging)
        driver.delete(vid)
        return data

    for thick in (False, True):
        fill_and_delete("tenant-a", thick)
        for name in ("tenant-a", "tenant-b"):  # same name (same ID) and a new one
            data = read_all(name, thick)
            assert len(data) == 16 * MiB
            assert b"TENANT-A" not in data, f"{name} (thick={thick}) shows the previous tenant's bytes"


def test_reboot_restage_keeps_data(base: str) -> None:
    d = Driver(base).start()
    vols = []
    for i, (fs, cap) in enumerate([("ext4", mount_cap("ext4")), ("xfs", mount_cap("xfs")), (None, block_cap())]):
        vid = d.create(f"reboot-{i}", 320 * MiB if fs == "xfs" else 32 * MiB, cap)
        staging, target = d.path("st", str(i)), d.path("pods", str(i), "t")
        os.makedirs(os.path.dirname(target))
        d.stage(vid, staging, cap)
        d.publish(vid, staging, target, cap)
        if fs:
            with open(os.path.join(target, "data"), "w") as f:
                f.write(f"volume {i}")
                f.flush()
                os.fsync(f.fileno())
        else:
            with open(target, "r+b") as f:
                f.write(b"BLOCK-DATA")
                f.flush()
                os.fsync(f.fileno())
        vols.append((vid, cap, staging, target, fs))
    # "Reboot": the driver dies, every mount is gone, every loop device detached.
    d.kill()
    for m in sorted(observe.mounts_under(base), key=lambda m: -len(m.mount_point)):
        subprocess.run(["umount", m.mount_point], check=True)
    for dev in observe.loops_under(base):
        subprocess.run(["losetup", "-d", dev.path], check=True)
    assert leftovers(base) == []
    d.start()
    # kubelet stages and publishes every volume again.
    for i, (vid, cap, staging, target, fs) in enumerate(vols):
        d.stage(vid, staging, cap)
        d.publish(vid, staging, target, cap)
        if fs:
            with open(os.path.join(target, "data")) as f:
                assert f.read() == f"volume {i}"
        else:
            with open(target, "rb") as f:
                assert f.read(10) == b"BLOCK-DATA"
    for vid, _, staging, target, _ in vols:
        d.unpublish(vid, target)
        d.unstage(vid, staging)
        d.delete(vid)
    assert d.stop() == 0
    assert leftovers(base) == []
