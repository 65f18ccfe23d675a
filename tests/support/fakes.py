"""In-memory stand-ins for the parts of the driver that touch storage or the host.

Every fake records the calls it receives as ``(method, args)`` so a test can
assert that a rejected request never reached it. ``raise_on[method] = exc``
makes a method raise instead of doing its work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from csi.backend.base import Parameters, check_compatible, member_name
from csi.errors import AlreadyExists, CommandError, FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from csi.host.paths import PathGuard
from csi.host.runner import Result
from csi.model import (
    PROVISIONING,
    AccessType,
    Capacity,
    Device,
    GroupSnapshot,
    Health,
    PoolStats,
    Snapshot,
    Volume,
    VolumeSpec,
    ids,
)
from csi.node.ops import Stats

MiB = 1024 * 1024
GiB = 1024 * MiB
POOL = "fake"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.raise_on: dict[str, BaseException] = {}

    def _record(self, method: str, *args: Any) -> None:
        self.calls.append((method, args))
        exc = self.raise_on.get(method)
        if exc is not None:
            raise exc

    def called(self, method: str) -> list[tuple[Any, ...]]:
        return [args for m, args in self.calls if m == method]

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]


class FakeBackend(Recorder):
    """The Backend protocol in memory, with the loop backend's semantics."""

    kind = "fake"
    parameters = Parameters(values={PROVISIONING: frozenset({"thin", "thick"})}, mutable=frozenset({PROVISIONING}))
    granularity = MiB
    min_size = MiB

    def __init__(self, *, capacity: int = 100 * GiB, ready: bool = True) -> None:
        super().__init__()
        self.capacity_bytes = capacity
        self.ready = ready
        self.volumes: dict[str, Volume] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.groups: dict[str, GroupSnapshot] = {}
        self.devices: dict[str, Device] = {}
        self.health_of: dict[str, Health] = {}

    # -- helpers for tests --------------------------------------------------------

    def add_volume(self, name: str, size: int = GiB, **kw: Any) -> Volume:
        vid = str(ids.new("v", POOL, name))
        fields: dict[str, Any] = {
            "access": AccessType.MOUNT,
            "fs_type": "ext4",
            "thick": False,
            "source": None,
            "parameters": {},
            "created_ns": 1_700_000_000_000_000_000,
        }
        fields.update(kw)
        vol = Volume(id=vid, name=name, size=size, **fields)
        self.volumes[vid] = vol
        return vol

    def _known(self, volume_id: str) -> Volume | None:
        oid = ids.parse(volume_id, "v")
        if oid is None or oid.pool != POOL:
            return None
        return self.volumes.get(volume_id)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._record("start")

    async def stop(self) -> None:
        self._record("stop")

    async def probe(self) -> None:
        self._record("probe")
        if not self.ready:
            raise Unavailable("the fake pool is still starting")

    def volume_named(self, name: str) -> Volume | None:
        return next((v for v in self.volumes.values() if v.name == name), None)

    # -- volumes ----------------------------------------------------------------------

    async def create_volume(self, spec: VolumeSpec) -> Volume:
        self._record("create_volume", spec)
        existing = self.volume_named(spec.name)
        if existing is not None:
            check_compatible(existing, spec)
            return existing
        vid = str(ids.new("v", POOL, spec.name))
        if spec.size > self.capacity_bytes:
            raise ResourceExhausted("the fake pool is full")
        vol = Volume(
            id=vid,
            name=spec.name,
            size=spec.size,
            access=spec.access,
            fs_type=spec.fs_type,
            thick=spec.thick,
            source=spec.source,
            parameters=dict(spec.parameters),
            created_ns=time.time_ns(),
            mutable=dict(spec.mutable),
        )
        self.volumes[vid] = vol
        return vol

    async def delete_volume(self, volume_id: str) -> None:
        self._record("delete_volume", volume_id)
        vol = self._known(volume_id)
        if vol is None:
            return
        if vol.attachments:
            raise FailedPrecondition(f"volume {volume_id} is published")
        del self.volumes[volume_id]

    async def get_volume(self, volume_id: str) -> Volume | None:
        self._record("get_volume", volume_id)
        return self._known(volume_id)

    async def list_volumes(self) -> list[Volume]:
        self._record("list_volumes")
        return [self.volumes[k] for k in sorted(self.volumes)]

    async def expand_volume(self, volume_id: str, size: int) -> Volume:
        self._record("expand_volume", volume_id, size)
        vol = self._known(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        if vol.size < size:
            vol = replace(vol, size=size)
            self.volumes[volume_id] = vol
        return vol

    async def capacity(self, parameters: Mapping[str, str]) -> Capacity:
        self._record("capacity", dict(parameters))
        used = sum(v.size for v in self.volumes.values())
        avail = max(0, self.capacity_bytes - used)
        return Capacity(available=avail, maximum_volume_size=avail, minimum_volume_size=self.min_size)

    async def set_attachment(self, volume_id: str, node_id: str, readonly: bool | None) -> Volume:
        self._record("set_attachment", volume_id, node_id, readonly)
        vol = self._known(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        att = dict(vol.attachments)
        if readonly is None:
            att.pop(node_id, None)
        else:
            att[node_id] = readonly
        vol = replace(vol, attachments=att)
        self.volumes[volume_id] = vol
        return vol

    async def modify_volume(self, volume_id: str, mutable: Mapping[str, str]) -> Volume:
        self._record("modify_volume", volume_id, dict(mutable))
        vol = self._known(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        want = mutable.get(PROVISIONING)
        if want is not None:
            vol = replace(vol, thick=want == "thick")
            self.volumes[volume_id] = vol
        return vol

    # -- snapshots ----------------------------------------------------------------------

    def _snap(self, name: str, vol: Volume, group_id: str | None) -> Snapshot:
        existing = next((x for x in self.snapshots.values() if x.name == name), None)
        sid = str(ids.new("s", POOL, name))
        if existing is not None:
            if existing.source_volume_id != vol.id:
                raise AlreadyExists(f"snapshot {name!r} already exists for another volume")
            return existing
        snap = Snapshot(
            id=sid,
            name=name,
            source_volume_id=vol.id,
            size=vol.size,
            created_ns=time.time_ns(),
            group_id=group_id,
            access=vol.access,
            fs_type=vol.fs_type,
        )
        self.snapshots[sid] = snap
        return snap

    async def create_snapshot(self, name: str, source_volume_id: str) -> Snapshot:
        self._record("create_snapshot", name, source_volume_id)
        vol = self._known(source_volume_id)
        if vol is None:
            raise NotFound(f"source volume {source_volume_id} does not exist")
        return self._snap(name, vol, None)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        self._record("delete_snapshot", snapshot_id)
        self.snapshots.pop(snapshot_id, None)

    async def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        self._record("get_snapshot", snapshot_id)
        return self.snapshots.get(snapshot_id)

    async def list_snapshots(self) -> list[Snapshot]:
        self._record("list_snapshots")
        return [self.snapshots[k] for k in sorted(self.snapshots)]

    async def create_group_snapshot(self, name: str, volume_ids: list[str]) -> GroupSnapshot:
        self._record("create_group_snapshot", name, list(volume_ids))
        members = sorted(set(volume_ids))
        existing = next((g for g in self.groups.values() if g.name == name), None)
        gid = str(ids.new("g", POOL, name))
        if existing is not None:
            if sorted(s.source_volume_id for s in existing.snapshots) != members:
                raise AlreadyExists(f"group snapshot {name!r} already exists with other volumes")
            return existing
        vols = []
        for vid in members:
            vol = self._known(vid)
            if vol is None:
                raise NotFound(f"source volume {vid} does not exist")
            vols.append(vol)
        snaps = tuple(self._snap(member_name(name, v.id), v, gid) for v in vols)
        group = GroupSnapshot(gid, name, snaps, time.time_ns())
        self.groups[gid] = group
        return group

    async def delete_group_snapshot(self, group_id: str) -> None:
        self._record("delete_group_snapshot", group_id)
        group = self.groups.pop(group_id, None)
        if group is not None:
            for s in group.snapshots:
                self.snapshots.pop(s.id, None)

    async def get_group_snapshot(self, group_id: str) -> GroupSnapshot | None:
        self._record("get_group_snapshot", group_id)
        return self.groups.get(group_id)

    # -- node side ------------------------------------------------------------------------

    async def attach(self, volume_id: str) -> Device:
        self._record("attach", volume_id)
        if self._known(volume_id) is None:
            raise NotFound(f"volume {volume_id} does not exist")
        dev = self.devices.get(volume_id)
        if dev is None:
            n = 40 + len(self.devices)
            dev = Device(name=f"loop{n}", path=f"/dev/loop{n}", major=7, minor=n)
            self.devices[volume_id] = dev
        return dev

    async def detach(self, volume_id: str) -> None:
        self._record("detach", volume_id)
        self.devices.pop(volume_id, None)

    async def find_device(self, volume_id: str) -> Device | None:
        self._record("find_device", volume_id)
        return self.devices.get(volume_id)

    async def refresh_device(self, volume_id: str) -> int:
        self._record("refresh_device", volume_id)
        vol = self._known(volume_id)
        if vol is None or volume_id not in self.devices:
            raise FailedPrecondition(f"volume {volume_id} is not staged on this node")
        return vol.size

    #: What proven_blank answers; False makes node code probe, as for real devices.
    blank_proof = False

    async def proven_blank(self, volume_id: str) -> bool:
        self._record("proven_blank", volume_id)
        return self.blank_proof

    async def mark_formatted(self, volume_id: str, fs_type: str, *, complete: bool = True) -> None:
        self._record("mark_formatted", volume_id, fs_type, complete)
        vol = self._known(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        if complete:
            self.volumes[volume_id] = replace(vol, formatted=fs_type, formatting=None)
        else:
            self.volumes[volume_id] = replace(vol, formatting=fs_type)

    async def health(self, volume_id: str, *, node: bool = True) -> Health:
        self._record("health", volume_id, node)
        return self.health_of.get(volume_id, Health(False, "ok"))

    async def pool_stats(self) -> list[PoolStats]:
        self._record("pool_stats")
        used = sum(v.size for v in self.volumes.values())
        return [
            PoolStats(
                pool=POOL,
                size_bytes=self.capacity_bytes,
                used_bytes=used,
                available_bytes=max(0, self.capacity_bytes - used),
                volumes=len(self.volumes),
                snapshots=len(self.snapshots),
            )
        ]


class FakeViews(Recorder):
    """The read-only views of devices (csi.node.views), in memory: a view is
    a device ``loop<900+n>`` over its source device's path."""

    def __init__(self) -> None:
        super().__init__()
        self.over: dict[str, Device] = {}  # view name -> the device it shows

    async def of(self, dev: Device) -> list[Device]:
        return [Device(n, "/dev/" + n, 7, int(n[4:])) for n, src in sorted(self.over.items()) if src == dev]

    async def get(self, dev: Device) -> tuple[Device, bool]:
        found = await self.of(dev)
        if found:
            return found[0], False
        self._record("get", dev)
        n = 900 + len(self.over)
        self.over[f"loop{n}"] = dev
        return Device(f"loop{n}", f"/dev/loop{n}", 7, n), True

    async def drop(self, view: Device) -> None:
        self._record("drop", view)
        self.over.pop(view.name, None)

    async def refresh(self, dev: Device) -> None:
        self._record("refresh", dev)


class FakeNodeOps(Recorder):
    """NodeOps with the same methods, recording instead of mounting.

    ``guard`` is a real PathGuard: the node service validates paths with it.
    """

    def __init__(self, kubelet_dir: str) -> None:
        super().__init__()
        self.guard = PathGuard(kubelet_dir)

    async def stage(self, volume_id: str, staging: str, cap: Any) -> None:
        self._record("stage", volume_id, staging, cap)

    async def unstage(self, volume_id: str, staging: str) -> None:
        self._record("unstage", volume_id, staging)

    async def publish(self, volume_id: str, staging: str, target: str, cap: Any, readonly: bool) -> None:
        self._record("publish", volume_id, staging, target, cap, readonly)

    async def unpublish(self, volume_id: str, target: str) -> None:
        self._record("unpublish", volume_id, target)

    async def stats(self, volume_id: str, path: str) -> Stats:
        self._record("stats", volume_id, path)
        return Stats(False, 10 * GiB, 6 * GiB, 4 * GiB, 1000, 900, 100, Health(False, "ok"))

    async def expand(self, volume_id: str, path: str, required: int) -> int:
        self._record("expand", volume_id, path, required)
        return max(required, GiB)


Handler = Callable[[tuple[str, ...]], tuple[int, bytes, bytes]]


class FakeRunner(Recorder):
    """The tests' one Runner: it answers instead of running anything.

    ``answers`` maps a program name (argv[0]) to (returncode, stdout, stderr);
    programs without an answer succeed with no output. A ``handler`` (an
    in-memory LVM, see fake_lvm.py) answers every command instead.
    """

    def __init__(
        self, answers: Mapping[str, tuple[int, bytes, bytes]] | None = None, *, handler: Handler | None = None
    ) -> None:
        super().__init__()
        self.answers = dict(answers or {})
        self.handler = handler

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        ok_codes: Sequence[int] = (0,),
        mutating: bool = True,
        stdin: bytes | None = None,
    ) -> Result:
        args = tuple(argv)
        self._record("run", args, {"timeout": timeout, "ok_codes": tuple(ok_codes), "mutating": mutating})
        rc, out, err = self.handler(args) if self.handler else self.answers.get(args[0], (0, b"", b""))
        if rc not in ok_codes:
            raise CommandError(args, rc, out, err)
        return Result(args, rc, out, err, 0.0)

    def argvs(self) -> list[tuple[str, ...]]:
        return [args[0] for args in self.called("run")]
