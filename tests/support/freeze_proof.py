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
from tests.support.rpc import mount_cap

#: The raw image or device of a volume (for the raw copies), by volume ID.
RawSource = Callable[[str], str]


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
def sources(s: Setup, count: int) -> Iterator[tuple[list[str], inv.Writer]]:
    """``count`` staged source volumes with their places, under the writer; all removed afterwards."""
    vids: list[str] = []
    try:
        for i in range(count):
            vids.append(s.create(f"inv-src-{i}"))
        with staged(s, vids, "src") as points:
            inv.prepare(points)
            with inv.Writer(inv.places(points)) as w:
                yield vids, w
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


def prove_snapshots(s: Setup, base: str) -> inv.Proof:
    proof = inv.Proof(f"snapshot, {s.what}")
    with sources(s, 1) as (vids, writer):
        inv.raw_copies(proof, [s.raw_source(vids[0])], 3, base)
        n = 0

        def trial() -> list[int]:
            nonlocal n
            n += 1
            req = csi_pb2.CreateSnapshotRequest(name=f"inv-snap-{n}", source_volume_id=vids[0])
            sid = s.driver.controller.CreateSnapshot(req).snapshot.snapshot_id
            try:
                restored = [_restored(s, f"inv-rst-{n}", snapshot_source(sid))]
            finally:
                s.driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
            return _read_restored(s, restored, f"rst-{n}")

        inv.trials(proof, writer, trial)
    return proof


def prove_groups(s: Setup, base: str) -> inv.Proof:
    proof = inv.Proof(f"group snapshot of two volumes, {s.what}")
    with sources(s, 2) as (vids, writer):
        inv.raw_copies(proof, [s.raw_source(v) for v in vids], 6, base)
        n = 0

        def trial() -> list[int]:
            nonlocal n
            n += 1
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
            return _read_restored(s, restored, f"grst-{n}")

        inv.trials(proof, writer, trial)
    return proof


def prove_clones(s: Setup, base: str) -> inv.Proof:
    proof = inv.Proof(f"clone, {s.what}")
    with sources(s, 1) as (vids, writer):
        inv.raw_copies(proof, [s.raw_source(vids[0])], 3, base)
        n = 0

        def trial() -> list[int]:
            nonlocal n
            n += 1
            clone = _restored(s, f"inv-clone-{n}", volume_source(vids[0]))
            return _read_restored(s, [clone], f"clone-{n}")

        inv.trials(proof, writer, trial)
    return proof


def loop_image(d: Driver) -> RawSource:
    """The backing file of a loop volume (what the loop backend copies)."""
    return lambda vid: os.path.join(d.pool, "volumes", f"{vid}.img")
