"""The volume plugin's calls, each translated into CSI calls to the driver.

Which volumes are the plugin's: those created through it, recorded with the
volume itself (``elv.csi.dev/created-by: docker-plugin``, shown in its
``volume_context``). Listing every ELV volume would hand Kubernetes PVs and
``elv volume create`` volumes to ``docker volume rm``; a record file of the
plugin's own would be lost with its directory and disagree with the driver.
A name that an ELV volume of another origin already has is refused at
Create, never adopted.

Calls on one volume run one at a time (a lock per name); the driver's own
per-volume gate guards against everything else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from csi.cmd.client import Client, mount_capability
from csi.cmd.common import CliError, all_volumes, call, find_snapshot, human, plugin, volume_name
from csi.cmd.dockerplugin.options import OptionError, Plan, plan
from csi.cmd.dockerplugin.options import volume_name as checked_name
from csi.cmd.dockerplugin.state import MAX_MOUNT_ID, VolumeDir, plugin_dir, volume_ids
from csi.host.mountinfo import MountTable
from csi.model import CREATED_BY, FS_KEY, PROVISIONING
from csi.v1 import csi_pb2

log = logging.getLogger("csi.docker-plugin")

ORIGIN = "docker-plugin"
Entry = csi_pb2.ListVolumesResponse.Entry
Body = dict[str, Any]


class PluginError(Exception):
    """A refusal, with the message the engine prints."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def ours(e: Entry) -> bool:
    return e.volume.volume_context.get(CREATED_BY) == ORIGIN


def _mount_id(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_MOUNT_ID or not value.isprintable():
        raise PluginError("the request needs a mount ID (ID) of at most 256 printable characters")
    return value


class Plugin:
    """The plugin's state is on disk and in the driver; this object only
    holds the client and the per-volume locks."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name
        self._locks: dict[str, asyncio.Lock] = {}
        self.routes: dict[str, Callable[[Body], Awaitable[Body]]] = {
            "/Plugin.Activate": self.activate,
            "/VolumeDriver.Capabilities": self.capabilities,
            "/VolumeDriver.Create": self.create,
            "/VolumeDriver.Remove": self.remove,
            "/VolumeDriver.Mount": self.mount,
            "/VolumeDriver.Unmount": self.unmount,
            "/VolumeDriver.Path": self.path,
            "/VolumeDriver.Get": self.get,
            "/VolumeDriver.List": self.list_volumes,
        }

    # -- dispatch -------------------------------------------------------------------------

    async def dispatch(self, path: str, body: Body) -> tuple[int, Body]:
        handler = self.routes.get(path)
        if handler is None:
            return 404, {"Err": f"the elv volume plugin has no call {path[:80]!r}"}
        t0 = time.monotonic()
        status, answer = 200, {}
        try:
            answer = await handler(body)
        except (PluginError, OptionError) as e:
            status, answer = 500, {"Err": str(e)}
        except CliError as e:
            status, answer = 500, {"Err": e.message + (f"; {e.hint}" if e.hint else "")}
        except Exception as e:
            log.exception("%s failed", path)
            status, answer = 500, {"Err": f"the elv volume plugin failed: {e}"}
        fields = {
            "call": path.lstrip("/"),
            "volume": body.get("Name", ""),
            "ms": round((time.monotonic() - t0) * 1000, 1),
        }
        if "Err" in answer:
            fields["error"] = answer["Err"]
        log.info("call", extra={"fields": fields})
        return status, answer

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _base(self) -> str:
        info = await plugin(self.client)
        return plugin_dir(info.manifest.get("kubelet-dir") or "/var/lib/kubelet", info.name, self.name)

    async def _find(self, name: str) -> Entry | None:
        """The ELV volume with this name, whoever made it."""
        return next((e for e in await all_volumes(self.client) if volume_name(e.volume) == name), None)

    async def _mine(self, name: str) -> tuple[Entry, VolumeDir]:
        e = await self._find(name)
        if e is None or not ours(e):
            raise PluginError(f"no such volume: {name}")
        return e, VolumeDir(await self._base(), e.volume.volume_id)

    # -- calls ---------------------------------------------------------------------------

    async def activate(self, body: Body) -> Body:
        return {"Implements": ["VolumeDriver"]}

    async def capabilities(self, body: Body) -> Body:
        return {"Capabilities": {"Scope": "local"}}

    async def create(self, body: Body) -> Body:
        name = checked_name(body.get("Name"))
        p = plan(body.get("Opts"))
        existing = await self._find(name)
        if existing is not None and not ours(existing):
            raise PluginError(
                f"an ELV volume named {name} exists but was not created through the volume plugin "
                "(a Kubernetes volume, or one made with `elv volume create`); choose another name"
            )
        if existing is not None and p.empty:
            return {}  # the same volume, asked for by another engine or a retry
        req = await self._request(name, p)
        ep = self.client.endpoint
        await call(ep, lambda: self.client.controller.CreateVolume(req, timeout=3600))
        return {}

    async def _request(self, name: str, p: Plan) -> csi_pb2.CreateVolumeRequest:
        params = {CREATED_BY: ORIGIN}
        if p.thick:
            params[PROVISIONING] = "thick"
        req = csi_pb2.CreateVolumeRequest(name=name, parameters=params)
        fs, size = p.fs, p.size
        if p.source is not None:
            src_fs, src_size = await self._source(p.source, req)
            fs, size = fs or src_fs, size or src_size
        req.volume_capabilities.append(mount_capability(fs or ""))
        if size:
            req.capacity_range.required_bytes = size
        return req

    async def _source(self, ref: str, req: csi_pb2.CreateVolumeRequest) -> tuple[str | None, int]:
        """Point ``req`` at the snapshot or volume ``ref`` names: (its filesystem if known, its size)."""
        vols = await all_volumes(self.client)
        by_id = {e.volume.volume_id: e for e in vols}
        named = [e for e in vols if ref in (volume_name(e.volume), e.volume.volume_id)]
        snap = await self._snapshot(ref)
        if snap is not None and named:
            raise PluginError(
                f"from={ref}: both a snapshot and a volume have that name; give the one you mean by its ID"
            )
        if snap is not None:
            req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
            origin = by_id.get(snap.source_volume_id)
            return (origin.volume.volume_context.get(FS_KEY) or None) if origin else None, snap.size_bytes
        if named:
            v = named[0].volume
            req.volume_content_source.volume.volume_id = v.volume_id
            return v.volume_context.get(FS_KEY) or None, v.capacity_bytes
        raise PluginError(
            f"from={ref}: no snapshot or volume has that name or ID (see `elv volume list` and `elv volume show VOLUME`)"
        )

    async def _snapshot(self, ref: str) -> csi_pb2.Snapshot | None:
        try:
            return await find_snapshot(self.client, ref)
        except CliError as e:
            if e.message.startswith("no snapshot named"):
                return None
            raise

    async def remove(self, body: Body) -> Body:
        name = checked_name(body.get("Name"))
        e = await self._find(name)
        if e is None:
            return {}  # already gone
        if not ours(e):
            raise PluginError(f"volume {name} was not created through the volume plugin; refusing to remove it")
        vd = VolumeDir(await self._base(), e.volume.volume_id)
        async with self._lock(name):
            n = vd.in_use(MountTable.load())
            if n:
                raise PluginError(
                    f"volume {name} is in use ({n} container mount{'s' if n > 1 else ''}); "
                    "stop the containers that use it first"
                )
            vd.clear_refs()
            await self._release(vd)
            req = csi_pb2.DeleteVolumeRequest(volume_id=vd.volume_id)
            await call(self.client.endpoint, lambda: self.client.controller.DeleteVolume(req, timeout=600))
            vd.remove()
        return {}

    async def mount(self, body: Body) -> Body:
        name = checked_name(body.get("Name"))
        mount_id = _mount_id(body.get("ID"))
        e, vd = await self._mine(name)
        async with self._lock(name):
            if not vd.published(MountTable.load()):
                dropped = vd.clear_refs()
                if dropped:
                    log.warning("dropped %d stale references of %s: it was not mounted", dropped, name)
                await self._publish(e, vd)
            vd.add_ref(mount_id)
        return {"Mountpoint": vd.target}

    async def _publish(self, e: Entry, vd: VolumeDir) -> None:
        vid, c = vd.volume_id, self.client
        cap = mount_capability(e.volume.volume_context.get(FS_KEY) or "")
        vd.prepare()
        was_staged = vd.staged(MountTable.load())
        stage = csi_pb2.NodeStageVolumeRequest(volume_id=vid, staging_target_path=vd.staging, volume_capability=cap)
        await call(c.endpoint, lambda: c.node.NodeStageVolume(stage, timeout=600))
        pub = csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=vd.staging, target_path=vd.target, volume_capability=cap
        )
        try:
            await call(c.endpoint, lambda: c.node.NodePublishVolume(pub, timeout=600))
        except BaseException:
            if not was_staged:  # undo only the stage this call made
                await self._release(vd)
            raise

    async def _release(self, vd: VolumeDir) -> None:
        """Unpublish and unstage what the plugin mounted for this volume (only that)."""
        vid, c = vd.volume_id, self.client
        if vd.published(MountTable.load()):
            req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=vd.target)
            await call(c.endpoint, lambda: c.node.NodeUnpublishVolume(req, timeout=600))
        if vd.staged(MountTable.load()):
            unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=vd.staging)
            await call(c.endpoint, lambda: c.node.NodeUnstageVolume(unstage, timeout=600))

    async def unmount(self, body: Body) -> Body:
        name = checked_name(body.get("Name"))
        mount_id = _mount_id(body.get("ID"))
        e = await self._find(name)
        if e is None or not ours(e):
            return {}  # nothing of ours to undo
        vd = VolumeDir(await self._base(), e.volume.volume_id)
        async with self._lock(name):
            if not vd.drop_ref(mount_id):
                log.warning("unmount of %s with a mount ID it does not hold: nothing to do", name)
                return {}
            if not vd.refs():
                await self._release(vd)
        return {}

    async def path(self, body: Body) -> Body:
        _, vd = await self._mine(checked_name(body.get("Name")))
        return {"Mountpoint": vd.target if vd.in_use(MountTable.load()) else ""}

    async def get(self, body: Body) -> Body:
        name = checked_name(body.get("Name"))
        e, vd = await self._mine(name)
        n = vd.in_use(MountTable.load())
        v = e.volume
        status: dict[str, object] = {
            "VolumeID": v.volume_id,
            "Size": human(v.capacity_bytes),
            "SizeBytes": v.capacity_bytes,
            "Filesystem": v.volume_context.get(FS_KEY, ""),
            "Mounts": n,
            "Condition": e.status.volume_condition.message or "ok",
        }
        status.update(await self._usage(vd) if n else {"Used": "unknown while not mounted"})
        return {"Volume": {"Name": name, "Mountpoint": vd.target if n else "", "Status": status}}

    async def _usage(self, vd: VolumeDir) -> dict[str, object]:
        req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=vd.volume_id, volume_path=vd.target)
        try:
            stats = await self.client.node.NodeGetVolumeStats(req, timeout=30)
        except grpc.aio.AioRpcError as e:
            return {"Used": f"unknown: {e.details()}"}
        for u in stats.usage:
            if u.unit == csi_pb2.VolumeUsage.BYTES:
                return {"Used": human(u.used), "UsedBytes": u.used, "Available": human(u.available)}
        return {"Used": "unknown"}

    async def list_volumes(self, body: Body) -> Body:
        vols = [e for e in await all_volumes(self.client) if ours(e)]
        if not vols:
            return {"Volumes": []}
        base, table = await self._base(), MountTable.load()
        out = []
        for e in vols:
            vd = VolumeDir(base, e.volume.volume_id)
            out.append({"Name": volume_name(e.volume), "Mountpoint": vd.target if vd.in_use(table) else ""})
        return {"Volumes": out}

    # -- restart --------------------------------------------------------------------------

    async def recover(self) -> None:
        """After a start: keep every mount some container holds; undo the plugin's
        own leftovers (a mount no reference holds was never handed to an engine,
        or its last reference was already dropped)."""
        base = await self._base()
        for vid in volume_ids(base):
            vd = VolumeDir(base, vid)
            table = MountTable.load()
            held = vd.in_use(table)
            if held:
                log.info("volume %s is mounted for %d container mount(s); kept", vid, held)
                continue
            vd.clear_refs()
            if vd.published(table) or vd.staged(table):
                log.info("volume %s was mounted with no reference; unmounting it", vid)
                await self._release(vd)
            vd.remove()
