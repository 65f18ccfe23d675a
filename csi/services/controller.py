"""CSI Controller service: validate, call the backend, wrap the result."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from google.protobuf import wrappers_pb2

from csi.backend.base import ControllerBackend
from csi.config import Config
from csi.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    UnknownClass,
)
from csi.model import DEFAULT_FS, PROVISIONING, AccessType, Source, Volume, VolumeSpec, ids
from csi.services import Context, convert
from csi.services import validation as v
from csi.services.gate import Gate, name_key
from csi.v1 import csi_pb2, csi_pb2_grpc

T = TypeVar("T")
RPC = csi_pb2.ControllerServiceCapability.RPC

CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME,
    RPC.CREATE_DELETE_SNAPSHOT,
    RPC.CLONE_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.LIST_SNAPSHOTS,
    RPC.GET_CAPACITY,
    RPC.EXPAND_VOLUME,
    RPC.GET_VOLUME,
    RPC.VOLUME_CONDITION,
    RPC.SINGLE_NODE_MULTI_WRITER,
    RPC.GET_SNAPSHOT,
    RPC.PUBLISH_UNPUBLISH_VOLUME,
    RPC.PUBLISH_READONLY,
    RPC.MODIFY_VOLUME,
)


def paginate(
    items: Sequence[T], key: Callable[[T], str], token: str, max_entries: int, kind: ids.Kind
) -> tuple[list[T], str]:
    """A page of ``items`` (sorted by key). The token is the key of the first
    entry of the next page, so deleting entries between calls is harmless."""
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    start = 0
    if token:
        if ids.parse(token, kind) is None:
            raise Aborted(f"starting_token {token!r} is not a token this driver issued")
        start = next((i for i, it in enumerate(items) if key(it) >= token), len(items))
    end = len(items) if max_entries == 0 else min(len(items), start + max_entries)
    nxt = key(items[end]) if end < len(items) else ""
    return list(items[start:end]), nxt


class Peers(Protocol):
    """The drivers of the other nodes (csi.kube.agent.KubeAgent, when the
    driver runs in a cluster)."""

    async def modify(self, volume_id: str, parameters: Mapping[str, str]) -> None:
        """Have the node that holds the volume apply the mutable parameters;
        raises its error. NotFound if no node holds it."""


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, config: Config, backend: ControllerBackend, gate: Gate, peers: Peers | None = None) -> None:
        self._config = config
        self._backend = backend
        self._gate = gate
        self._peers = peers
        self._topology = {config.topology_key: config.node_id}

    # -- helpers ----------------------------------------------------------------

    def _volume_parameters(self, params: dict[str, str]) -> dict[str, str]:
        own = self._backend.parameters.values
        checked = v.parameters(params, {**v.COMMON, **own})
        # Only the keys that shape the volume (and the recorded ones) take part
        # in idempotency checks.
        return {k: val for k, val in checked.items() if k in own or k in v.RECORDED}

    def _mutable_parameters(self, params: dict[str, str]) -> dict[str, str]:
        return v.parameters(params, self._backend.parameters.mutable_values, "mutable_parameters")

    async def _existing(self, volume_id: str) -> Volume:
        vol = await self._backend.get_volume(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return vol

    def _check_topology(self, req: csi_pb2.TopologyRequirement | None) -> None:
        if req is None or not req.requisite:
            return
        for topo in req.requisite:
            if dict(topo.segments) == self._topology:
                return
        raise ResourceExhausted(
            f"this driver serves node {self._config.node_id!r}, which is not in the requisite topology"
        )

    async def _check_source_here(self, source: Source) -> None:
        """A snapshot or volume lives on one node, and a copy of it can only be
        made there. With topology (a cluster), a source this node does not hold
        is RESOURCE_EXHAUSTED: "not in this topology", which makes
        csi-provisioner ask the scheduler for another node; NOT_FOUND would
        make it retry here forever. (Without topology, the backend answers
        NOT_FOUND as the spec asks for a missing source.)"""
        found = (
            await self._backend.get_snapshot(source.id)
            if source.kind == "snapshot"
            else await self._backend.get_volume(source.id)
        )
        if found is None:
            raise ResourceExhausted(
                f"source {source.kind} {source.id} is not on node {self._config.node_id}: a volume made from it "
                "must be on the node that holds it (schedule its pod there)"
            )

    # -- volumes ------------------------------------------------------------------

    async def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: Context
    ) -> csi_pb2.CreateVolumeResponse:
        name = v.name(request.name)
        caps = v.capabilities(request.volume_capabilities)
        v.string_map(request.secrets, "secrets")
        params = dict(request.parameters)
        shaping = self._volume_parameters(params)
        mutable = self._mutable_parameters(dict(request.mutable_parameters))
        access = caps[0].access
        fs_type: str | None = None
        if access == AccessType.MOUNT:
            from_caps = next((c.fs_type for c in caps if c.fs_type), None)
            from_params = params.get(v.FSTYPE_KEY)
            if from_caps and from_params and from_caps != from_params:
                raise InvalidArgument(f"the capability asks for {from_caps} but {v.FSTYPE_KEY} says {from_params}")
            fs_type = from_caps or from_params or DEFAULT_FS
        minimum = max(self._backend.min_size, v.fs_minimum(fs_type))
        capacity_range = request.capacity_range if request.HasField("capacity_range") else None
        size = v.size(capacity_range, minimum=minimum, granularity=self._backend.granularity)
        self._check_topology(
            request.accessibility_requirements if request.HasField("accessibility_requirements") else None
        )
        source = (
            convert.content_source(request.volume_content_source) if request.HasField("volume_content_source") else None
        )
        if source is not None and request.HasField("accessibility_requirements"):
            await self._check_source_here(source)
        spec = VolumeSpec(
            name=name,
            size=size,
            access=access,
            fs_type=fs_type,
            thick={**shaping, **mutable}.get(PROVISIONING) == "thick",
            source=source,
            parameters=shaping,
            mutable=mutable,
            limit=capacity_range.limit_bytes if capacity_range is not None else 0,
        )
        keys = [name_key("volume", name)] + ([source.id] if source else [])
        vol = await self._gate.rpc(request, keys, lambda: self._backend.create_volume(spec))
        return csi_pb2.CreateVolumeResponse(volume=convert.volume(vol, self._topology))

    async def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: Context
    ) -> csi_pb2.DeleteVolumeResponse:
        vid = v.required_id(request.volume_id, "volume_id")
        await self._gate.rpc(request, [vid], lambda: self._backend.delete_volume(vid))
        return csi_pb2.DeleteVolumeResponse()

    async def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: Context
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        vid = v.required_id(request.volume_id, "volume_id")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities is required")
        vol = await self._existing(vid)
        for cap in request.volume_capabilities:
            problem = v.capability_problem(cap)
            if problem is None:
                c = v.capability(cap)
                if c.access != vol.access:
                    problem = f"the volume is a {vol.access.value} volume"
                elif c.fs_type and c.fs_type != (vol.formatted or vol.fs_type):
                    problem = f"the volume holds {vol.formatted or vol.fs_type}"
            if problem is not None:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=problem)
        try:
            self._volume_parameters(dict(request.parameters))
        except InvalidArgument as e:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=e.message)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    async def _status(self, volume_id: str) -> csi_pb2.ListVolumesResponse.VolumeStatus:
        # The controller's view: is the data there? (Not staged is healthy.)
        h = await self._backend.health(volume_id, node=False)
        return csi_pb2.ListVolumesResponse.VolumeStatus(
            volume_condition=csi_pb2.VolumeCondition(abnormal=h.abnormal, message=h.message if h.abnormal else "ok")
        )

    async def ListVolumes(self, request: csi_pb2.ListVolumesRequest, context: Context) -> csi_pb2.ListVolumesResponse:
        vols = await self._backend.list_volumes()
        page, nxt = paginate(vols, lambda x: x.id, request.starting_token, request.max_entries, "v")
        entries = [
            csi_pb2.ListVolumesResponse.Entry(volume=convert.volume(x, self._topology), status=await self._status(x.id))
            for x in page
        ]
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=nxt)

    async def ControllerGetVolume(
        self, request: csi_pb2.ControllerGetVolumeRequest, context: Context
    ) -> csi_pb2.ControllerGetVolumeResponse:
        vid = v.required_id(request.volume_id, "volume_id")
        vol = await self._existing(vid)
        st = await self._status(vid)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=convert.volume(vol, self._topology),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(volume_condition=st.volume_condition),
        )

    async def GetCapacity(self, request: csi_pb2.GetCapacityRequest, context: Context) -> csi_pb2.GetCapacityResponse:
        """What this node can still promise for a class. A class this node does
        not serve (one for the other backend, or an LVM device class it lacks)
        has no capacity here, which is not an error: csi-provisioner asks every
        node about every class, and retries an error forever."""
        params = dict(request.parameters)
        nothing = csi_pb2.GetCapacityResponse(available_capacity=0)
        if v.foreign_keys(params, self._backend.parameters.values):
            return nothing
        self._volume_parameters(params)
        if request.HasField("accessible_topology") and dict(request.accessible_topology.segments) != self._topology:
            return nothing
        for cap in request.volume_capabilities:
            if v.capability_problem(cap) is not None:
                return nothing
        try:
            c = await self._backend.capacity(params)
        except UnknownClass:
            return nothing
        return csi_pb2.GetCapacityResponse(
            available_capacity=c.available,
            maximum_volume_size=wrappers_pb2.Int64Value(value=c.maximum_volume_size),
            minimum_volume_size=wrappers_pb2.Int64Value(value=c.minimum_volume_size),
        )

    async def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        caps = [t for t in CAPABILITIES if not (t == RPC.EXPAND_VOLUME and self._config.node_expansion_only)]
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[csi_pb2.ControllerServiceCapability(rpc=RPC(type=t)) for t in caps]
        )

    async def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: Context
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        vid = v.required_id(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        if request.HasField("volume_capability"):
            v.capability(request.volume_capability)
        wanted = request.capacity_range

        async def grow() -> Volume:
            # Read the size under the volume's lock, in the task that grows it: the
            # backend's lookup then reuses this read (one report, not two), and a
            # concurrent expansion cannot change the size between check and grow.
            vol = await self._existing(vid)
            size = v.size(wanted, minimum=vol.size, granularity=self._backend.granularity)
            return await self._backend.expand_volume(vid, size)

        grown = await self._gate.rpc(request, [vid], grow)
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=grown.size, node_expansion_required=True)

    async def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: Context
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        """Volumes are local, so "publishing" to a node only checks that the node
        is this one and records the attachment; DeleteVolume refuses while one
        exists. Kubernetes skips this RPC (the CSIDriver says attachRequired:
        false); other orchestrators may call it."""
        vid = v.required_id(request.volume_id, "volume_id")
        node = v.required_id(request.node_id, "node_id")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        cap = v.capability(request.volume_capability)
        readonly = request.readonly

        async def publish() -> None:
            # Checked under the volume's lock: two publishes to one node with
            # different readonly must not both answer OK, the second overwriting.
            vol = await self._existing(vid)
            if node != self._config.node_id:
                raise NotFound(
                    f"node {node!r} is not served by this driver; volume {vid} lives on {self._config.node_id!r}"
                )
            if cap.access != vol.access:
                raise InvalidArgument(f"volume {vid} is a {vol.access.value} volume")
            if node in vol.attachments:
                if vol.attachments[node] != readonly:
                    raise AlreadyExists(
                        f"volume {vid} is already published to {node} with readonly={vol.attachments[node]}"
                    )
                return
            limit = self._config.max_volumes_per_node
            if limit and sum(1 for x in await self._backend.list_volumes() if node in x.attachments) >= limit:
                raise ResourceExhausted(f"node {node!r} already has {limit} volumes published (--max-volumes-per-node)")
            await self._backend.set_attachment(vid, node, readonly)

        await self._gate.rpc(request, [vid], publish)
        return csi_pb2.ControllerPublishVolumeResponse(publish_context={})

    async def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: Context
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        vid = v.required_id(request.volume_id, "volume_id")
        vol = await self._backend.get_volume(vid)
        if vol is not None:
            nodes = [request.node_id] if request.node_id else list(vol.attachments)
            for node in nodes:
                await self._gate.rpc(request, [vid], functools.partial(self._backend.set_attachment, vid, node, None))
        return csi_pb2.ControllerUnpublishVolumeResponse()

    async def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: Context
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        """In a cluster only one node's csi-resizer acts (it holds the lease) and
        calls its own node's driver for every volume: a volume of another node
        is handed to that node's driver (Peers), whose answer is returned."""
        vid = v.required_id(request.volume_id, "volume_id")
        mutable = self._mutable_parameters(dict(request.mutable_parameters))
        v.string_map(request.secrets, "secrets")
        if self._peers is not None and await self._backend.get_volume(vid) is None:
            await self._peers.modify(vid, mutable)
        else:
            await self.modify_here(vid, mutable)
        return csi_pb2.ControllerModifyVolumeResponse()

    async def modify_here(self, volume_id: str, mutable_parameters: Mapping[str, str]) -> None:
        """ControllerModifyVolume of a volume on this node, never forwarded
        (what a request handed over by another node's driver runs)."""
        vid = v.required_id(volume_id, "volume_id")
        mutable = self._mutable_parameters(dict(mutable_parameters))
        await self._existing(vid)
        # The gate knows a retry by the request: the same one, secrets aside.
        request = csi_pb2.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters=mutable)
        await self._gate.rpc(request, [vid], lambda: self._backend.modify_volume(vid, mutable))

    # -- snapshots ------------------------------------------------------------------

    async def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: Context
    ) -> csi_pb2.CreateSnapshotResponse:
        name = v.name(request.name)
        src = v.required_id(request.source_volume_id, "source_volume_id")
        v.parameters(dict(request.parameters), v.SNAPSHOT)
        keys = [name_key("snapshot", name), src]
        snap = await self._gate.rpc(request, keys, lambda: self._backend.create_snapshot(name, src))
        return csi_pb2.CreateSnapshotResponse(snapshot=convert.snapshot(snap))

    async def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: Context
    ) -> csi_pb2.DeleteSnapshotResponse:
        sid = v.required_id(request.snapshot_id, "snapshot_id")
        snap = await self._backend.get_snapshot(sid)
        if snap is not None and snap.group_id:
            raise FailedPrecondition(f"snapshot {sid} belongs to group snapshot {snap.group_id}; delete the group")
        await self._gate.rpc(request, [sid], lambda: self._backend.delete_snapshot(sid))
        return csi_pb2.DeleteSnapshotResponse()

    async def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: Context
    ) -> csi_pb2.ListSnapshotsResponse:
        snaps = await self._backend.list_snapshots()
        if request.snapshot_id:
            snaps = [s for s in snaps if s.id == request.snapshot_id]
        if request.source_volume_id:
            snaps = [s for s in snaps if s.source_volume_id == request.source_volume_id]
        page, nxt = paginate(snaps, lambda s: s.id, request.starting_token, request.max_entries, "s")
        return csi_pb2.ListSnapshotsResponse(
            entries=[csi_pb2.ListSnapshotsResponse.Entry(snapshot=convert.snapshot(s)) for s in page], next_token=nxt
        )

    async def GetSnapshot(self, request: csi_pb2.GetSnapshotRequest, context: Context) -> csi_pb2.GetSnapshotResponse:
        sid = v.required_id(request.snapshot_id, "snapshot_id")
        snap = await self._backend.get_snapshot(sid)
        if snap is None:
            raise NotFound(f"snapshot {sid} does not exist")
        return csi_pb2.GetSnapshotResponse(snapshot=convert.snapshot(snap))
