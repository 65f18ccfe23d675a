"""A thick volume keeps every block of its backing file for its whole life,
whatever runs on it: mkfs, ext4's lazy inode-table init, fstrim, the discard
mount option, blkdiscard on a raw block volume. Thin volumes still give
space back when trimmed. Every figure is the test's own ``st_blocks`` of the
backing file, and the loop devices are read from /sys/block directly."""

from __future__ import annotations

import os
import subprocess
import time

from csi.model import PROVISIONING
from csi.v1 import csi_pb2
from tests.support.driver import Driver, MiB, leftovers
from tests.support.rpc import block_cap, mount_cap

THICK = {PROVISIONING: "thick"}
#: How long ext4's lazy init may take for the volumes here (about 6 s for 256 MiB on an idle machine).
LAZY_INIT_BUDGET = 120.0


def allocated(d: Driver, vid: str) -> int:
    return os.stat(os.path.join(d.pool, "volumes", vid + ".img")).st_blocks * 512


def loop_of(d: Driver, vid: str) -> str:
    """The loop device whose backing file is the volume's image, from /sys/block."""
    image = os.path.realpath(os.path.join(d.pool, "volumes", vid + ".img"))
    found = []
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                if f.read().rstrip("\n") == image:
                    found.append(name)
        except OSError:
            continue
    assert len(found) == 1, found
    return found[0]


def queue(name: str, attr: str) -> int | None:
    try:
        with open(f"/sys/block/{name}/queue/{attr}") as f:
            return int(f.read())
    except FileNotFoundError:
        return None


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def itable_zeroed(dev: str) -> tuple[int, int]:
    """(groups whose inode table ext4 has zeroed, groups): dumpe2fs reads the
    group descriptors, where lazy init sets ITABLE_ZEROED as it finishes each."""
    out = run("dumpe2fs", dev).stdout
    groups = [line for line in out.splitlines() if line.startswith("Group ") and line[6:7].isdigit()]
    return sum("ITABLE_ZEROED" in g for g in groups), len(groups)


def wait_for_lazy_init(dev: str, mount_point: str) -> float:
    start = time.monotonic()
    while True:
        run("sync", "-f", mount_point)  # the flags reach the device with the journal
        done, groups = itable_zeroed(dev)
        if groups and done == groups:
            return time.monotonic() - start
        assert time.monotonic() - start < LAZY_INIT_BUDGET, f"lazy init zeroed {done} of {groups} inode tables"
        time.sleep(0.5)


def write_and_remove(path: str, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    os.unlink(path)
    run("sync", "-f", os.path.dirname(path))


def test_a_thick_filesystem_volume_stays_fully_allocated(driver: Driver) -> None:
    size = 256 * MiB  # two block groups: lazy init zeroes 16 MiB of inode tables
    vid = driver.create("thick-fs", size, parameters=THICK)
    assert allocated(driver, vid) >= size
    staging = driver.path("st", "thick-fs")
    driver.stage(vid, staging)
    assert allocated(driver, vid) >= size, "right after stage (mkfs)"
    dev = "/dev/" + loop_of(driver, vid)
    done, groups = itable_zeroed(dev)
    assert done < groups, "lazy init had nothing left to do: the test would prove nothing"
    wait_for_lazy_init(dev, staging)
    assert allocated(driver, vid) >= size, "after ext4's lazy init zeroed the inode tables"
    write_and_remove(os.path.join(staging, "junk"), 32 * MiB)
    run("fstrim", staging)  # "not supported" on a thick volume's device
    assert allocated(driver, vid) >= size, "after fstrim"
    driver.unstage(vid, staging)
    # Staged again with the discard mount option: deletes free nothing either.
    driver.stage(vid, staging, mount_cap(flags=("discard",)))
    write_and_remove(os.path.join(staging, "junk"), 32 * MiB)
    time.sleep(1)
    assert allocated(driver, vid) >= size, "after deletes under -o discard"
    driver.unstage(vid, staging)
    driver.delete(vid)
    assert leftovers(driver.base) == []


def test_a_thick_block_volume_stays_fully_allocated(driver: Driver) -> None:
    size = 64 * MiB
    vid = driver.create("thick-raw", size, block_cap(), parameters=THICK)
    staging, target = driver.path("st", "thick-raw"), driver.path("pods", "p", "dev")
    os.makedirs(os.path.dirname(target))
    driver.stage(vid, staging, block_cap())
    driver.publish(vid, staging, target, block_cap())
    with open(target, "r+b") as f:
        f.write(b"tenant data" * 1000)
        os.fsync(f.fileno())
    assert run("blkdiscard", "-f", target).returncode != 0, "discard must be refused"
    assert allocated(driver, vid) >= size, "after blkdiscard"
    assert run("fallocate", "-p", "-o", "0", "-l", str(8 * MiB), target).returncode != 0
    assert allocated(driver, vid) >= size, "after a hole punched through the device"
    assert run("blkdiscard", "-f", "-z", target).returncode == 0, "zeroing is a write, and allowed"
    assert allocated(driver, vid) >= size, "after blkdiscard -z"
    with open(target, "rb") as f:
        assert f.read(MiB) == bytes(MiB)
    driver.unpublish(vid, target)
    driver.unstage(vid, staging)
    driver.delete(vid)
    assert leftovers(driver.base) == []


def test_a_thin_volume_gives_space_back_when_trimmed(driver: Driver) -> None:
    vid = driver.create("thin-fs", 128 * MiB)
    staging = driver.path("st", "thin-fs")
    driver.stage(vid, staging)
    name = loop_of(driver, vid)
    assert queue(name, "discard_max_bytes"), "a thin volume's device discards"
    path = os.path.join(staging, "junk")
    with open(path, "wb") as f:
        f.write(os.urandom(48 * MiB))
        os.fsync(f.fileno())
    full = allocated(driver, vid)
    os.unlink(path)
    run("sync", "-f", staging)  # ext4 frees the blocks when the journal commits
    assert run("fstrim", staging).returncode == 0
    assert allocated(driver, vid) <= full - 40 * MiB, "fstrim must give the deleted file's blocks back"
    driver.unstage(vid, staging)
    driver.delete(vid)
    assert leftovers(driver.base) == []


def test_a_device_a_thick_volume_used_is_never_handed_to_a_thin_one(driver: Driver) -> None:
    # The kernel keeps a loop device's discard switch across detach (6.9+),
    # and loop device numbers are reused: a thin volume staged after a thick
    # one must still discard.
    thick = driver.create("was-thick", 32 * MiB, parameters=THICK)
    st = driver.path("st", "was-thick")
    driver.stage(thick, st)
    used = loop_of(driver, thick)
    assert queue(used, "discard_max_bytes") == 0
    driver.unstage(thick, st)
    limit, hw = queue(used, "discard_max_bytes"), queue(used, "discard_max_hw_bytes")
    assert not (limit == 0 and hw), f"/dev/{used} was left unable to discard for whoever attaches it next"
    thin = driver.create("now-thin", 32 * MiB)
    st2 = driver.path("st", "now-thin")
    driver.stage(thin, st2)
    assert queue(loop_of(driver, thin), "discard_max_bytes")
    driver.unstage(thin, st2)
    driver.delete(thin)
    driver.delete(thick)


def test_made_thick_while_staged_it_stops_freeing_blocks(driver: Driver) -> None:
    size = 64 * MiB
    vid = driver.create("to-thick", size)
    staging = driver.path("st", "to-thick")
    driver.stage(vid, staging)
    assert allocated(driver, vid) < size
    modify = csi_pb2.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters=THICK)
    driver.controller.ControllerModifyVolume(modify)
    assert allocated(driver, vid) >= size, "ControllerModifyVolume allocates every block"
    write_and_remove(os.path.join(staging, "junk"), 16 * MiB)
    run("fstrim", staging)
    assert allocated(driver, vid) >= size, "the staged device stopped freeing blocks"
    # Made thin again, it gives space back once staged anew.
    modify = csi_pb2.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters={PROVISIONING: "thin"})
    driver.controller.ControllerModifyVolume(modify)
    driver.unstage(vid, staging)
    driver.stage(vid, staging)
    write_and_remove(os.path.join(staging, "junk"), 16 * MiB)
    assert run("fstrim", staging).returncode == 0
    assert allocated(driver, vid) < size
    driver.unstage(vid, staging)
    driver.delete(vid)
    assert leftovers(driver.base) == []
