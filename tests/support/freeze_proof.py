"""The freeze proofs through CSI, shared by the loop (host) and LVM (guest)
tests: snapshots, group snapshots and clones taken under the invariant
writer's load (tests/support/invariant.py) must restore a state that existed.

Each proof stages its source volumes, lays out the places, starts the writer,
shows with raw copies that the load tears a copy made without a freeze, then
runs its trials for the time box and checks every one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from csi.v1 import csi_pb2
from tests.support import invariant as inv
from tests.support.driver import Driver, MiB
from tests.support.rpc import block_cap, mount_cap

#: The raw image or device of a volume (for the raw copies), by volume ID and staging path.
RawSource = Callable[[str, str], str]


@dataclass
class Setup:
    driver: Driver
    fs: str
    params: dict[str, str]
    raw_source: RawSource
    what: str

    @property
    def size(self) -> int:
        return 320 * MiB if self.fs == "xfs" else 64 * MiB

    def cap(self) -> csi_pb2.VolumeCapability:
        return mount_cap(self.fs)

    def create(self, name: str, source: csi_pb2.VolumeContentSource | None = None) -> str:
        kw: dict[str, object] = {"parameters": self.params}
        if source is not None:
            kw["volume_content_source"] = source
        return self.driver.create(name, self.size, self.cap(), **kw)


@contextlib.contextmanager
def staged(s: Setup, vids: list[str], tag: str) -> Iterator[list[str]]:
    """Stage the volumes; unstage them afterwards, whatever happened."""
    points: list[str] = []
    try:
        for i, vid in enumerate(vids):
            st = s.driver.path("st", f"{tag}-{i}")
            s.driver.stage(vid, st, s.cap())
            points.append(st)
        yield points
    finally:
        for vid, st in zip(vids, points, strict=False):
            s.driver.unstage(vid, st)


@contextlib.contextmanager
def sources(s: Setup, count: int) -> Iterator[tuple[list[str], inv.Writer, list[str]]]:
    """``count`` staged source volumes with their places, under the writer,
    and their raw images or devices; all removed afterwards."""
    vids: list[str] = []
    try:
        for i in range(count):
            vids.append(s.create(f"inv-src-{i}"))
        with staged(s, vids, "src") as points:
            inv.prepare(points)
            raw = [s.raw_source(vid, mp) for vid, mp in zip(vids, points, strict=True)]
            with inv.Writer(inv.places(points)) as w:
                yield vids, w, raw
            print(f"  the writer ran {w.rounds} rounds")
    finally:
        for vid in vids:
            s.driver.delete(vid)


def _restored(s: Setup, name: str, src: csi_pb2.VolumeContentSource) -> str:
    return s.create(name, src)


def _read_restored(s: Setup, vids: list[str], tag: str) -> list[int]:
    try:
        with staged(s, vids, tag) as points:
            return inv.read_values(points)
    finally:
        for vid in vids:
            s.driver.delete(vid)


def snapshot_source(sid: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=sid))


def volume_source(vid: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vid))


def _prove(
    s: Setup, base: str, what: str, count: int, copies: int, tag: str, restore: Callable[[int, list[str]], list[str]]
) -> inv.Proof:
    """Run trials on ``count`` sources under the writer: each takes
    ``restore(n, sources)`` (the volumes it made from them) and reads their
    places back; ``copies`` unfrozen raw copies show the load would tear."""
    proof = inv.Proof(f"{what}, {s.what}")
    with sources(s, count) as (vids, writer, raw):
        inv.raw_copies(proof, raw, copies, base)
        n = 0

        def trial() -> list[int]:
            nonlocal n
            n += 1
            return _read_restored(s, restore(n, vids), f"{tag}-{n}")

        inv.trials(proof, writer, trial)
    return proof


def prove_snapshots(s: Setup, base: str) -> inv.Proof:
    def restore(n: int, vids: list[str]) -> list[str]:
        req = csi_pb2.CreateSnapshotRequest(name=f"inv-snap-{n}", source_volume_id=vids[0])
        sid = s.driver.controller.CreateSnapshot(req).snapshot.snapshot_id
        try:
            return [_restored(s, f"inv-rst-{n}", snapshot_source(sid))]
        finally:
            s.driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))

    return _prove(s, base, "snapshot", 1, 3, "rst", restore)


def prove_groups(s: Setup, base: str) -> inv.Proof:
    def restore(n: int, vids: list[str]) -> list[str]:
        req = csi_pb2.CreateVolumeGroupSnapshotRequest(name=f"inv-grp-{n}", source_volume_ids=vids)
        g = s.driver.group.CreateVolumeGroupSnapshot(req).group_snapshot
        by_source = {m.source_volume_id: m.snapshot_id for m in g.snapshots}
        restored: list[str] = []
        try:
            for i, vid in enumerate(vids):  # in the writer's order of volumes
                restored.append(_restored(s, f"inv-grst-{n}-{i}", snapshot_source(by_source[vid])))
        except BaseException:
            for vid in restored:
                s.driver.delete(vid)
            raise
        finally:
            s.driver.group.DeleteVolumeGroupSnapshot(
                csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id)
            )
        return restored

    return _prove(s, base, "group snapshot of two volumes", 2, 6, "grst", restore)


def prove_clones(s: Setup, base: str) -> inv.Proof:
    return _prove(
        s, base, "clone", 1, 3, "clone", lambda n, vids: [_restored(s, f"inv-clone-{n}", volume_source(vids[0]))]
    )


def loop_image(d: Driver) -> RawSource:
    """The backing file of a loop volume (what the loop backend copies)."""
    return lambda vid, _: os.path.join(d.pool, "volumes", f"{vid}.img")


def staged_device(_: str, mount_point: str) -> str:
    """The block device mounted at ``mount_point`` (/dev/<kernel name>), from mountinfo and sysfs."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        found = [line.split()[2] for line in f if line.split()[4] == mount_point]
    assert len(found) == 1, f"{mount_point} is mounted {len(found)} times"
    with open(f"/sys/dev/block/{found[0]}/uevent", encoding="ascii") as f:
        name = next(line.split("=", 1)[1].strip() for line in f if line.startswith("DEVNAME="))
    return "/dev/" + name


def prove_raw_block(d: Driver, base: str, kind: str, what: str) -> inv.Proof:
    """Snapshots or clones of a published raw block volume under a writer
    of two far places: one instant only where the pool copies by reflink
    (a raw device has nothing to freeze; README, Known limits)."""
    proof = inv.Proof(f"{kind} of a raw block volume, {what}")
    cap = block_cap()
    vid = d.create("inv-raw", 64 * MiB, cap)
    st, dev = d.path("st", "inv-raw"), d.path("pub", "inv-raw")
    os.makedirs(os.path.dirname(dev), exist_ok=True)
    d.stage(vid, st, cap)
    d.publish(vid, st, dev, cap)
    n = 0

    def restored_values(source: csi_pb2.VolumeContentSource) -> list[int]:
        copy = d.create(f"inv-raw-{n}", 64 * MiB, cap, volume_content_source=source)
        cst, cdev = d.path("st", f"raw-{n}"), d.path("pub", f"raw-{n}")
        try:
            d.stage(copy, cst, cap)
            d.publish(copy, cst, cdev, cap)
            try:
                return inv.read_device_values(cdev)
            finally:
                d.unpublish(copy, cdev)
                d.unstage(copy, cst)
        finally:
            d.delete(copy)

    def trial() -> list[int]:
        nonlocal n
        n += 1
        if kind == "clone":
            return restored_values(volume_source(vid))
        req = csi_pb2.CreateSnapshotRequest(name=f"inv-raw-snap-{n}", source_volume_id=vid)
        sid = d.controller.CreateSnapshot(req).snapshot.snapshot_id
        try:
            return restored_values(snapshot_source(sid))
        finally:
            d.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))

    try:
        inv.prepare_device(dev)
        with inv.Writer(inv.device_places(dev)) as writer:
            inv.raw_copies(proof, [loop_image(d)(vid, st)], 2, base)
            inv.trials(proof, writer, trial)
    finally:
        d.unpublish(vid, dev)
        d.unstage(vid, st)
        d.delete(vid)
    return proof
