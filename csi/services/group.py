"""CSI GroupController service: crash-consistent snapshots of several volumes."""

from __future__ import annotations

from csi.backend.base import ControllerBackend
from csi.errors import InvalidArgument, NotFound
from csi.model import GroupSnapshot
from csi.services import Context, convert
from csi.services import validation as v
from csi.services.gate import Gate, name_key
from csi.v1 import csi_pb2, csi_pb2_grpc

RPC = csi_pb2.GroupControllerServiceCapability.RPC


def group_message(g: GroupSnapshot) -> csi_pb2.VolumeGroupSnapshot:
    return csi_pb2.VolumeGroupSnapshot(
        group_snapshot_id=g.id,
        snapshots=[convert.snapshot(s) for s in g.snapshots],
        creation_time=convert.timestamp(g.created_ns),
        ready_to_use=all(s.ready for s in g.snapshots),
    )


def _check_members(g: GroupSnapshot, snapshot_ids: list[str]) -> None:
    if snapshot_ids and sorted(snapshot_ids) != sorted(s.id for s in g.snapshots):
        raise InvalidArgument(f"snapshot_ids do not match the members of group snapshot {g.id}")


class GroupControllerService(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, backend: ControllerBackend, gate: Gate) -> None:
        self._backend = backend
        self._gate = gate

    async def GroupControllerGetCapabilities(
        self, request: csi_pb2.GroupControllerGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        cap = csi_pb2.GroupControllerServiceCapability(rpc=RPC(type=RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT))
        return csi_pb2.GroupControllerGetCapabilitiesResponse(capabilities=[cap])

    async def CreateVolumeGroupSnapshot(
        self, request: csi_pb2.CreateVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        name = v.name(request.name)
        if not request.source_volume_ids:
            raise InvalidArgument("source_volume_ids is required")
        vids = [v.required_id(x, "source_volume_ids") for x in request.source_volume_ids]
        v.parameters(dict(request.parameters), v.GROUP_SNAPSHOT)
        keys = [name_key("group snapshot", name), *vids]
        group = await self._gate.rpc(request, keys, lambda: self._backend.create_group_snapshot(name, vids))
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=group_message(group))

    async def DeleteVolumeGroupSnapshot(
        self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        gid = v.required_id(request.group_snapshot_id, "group_snapshot_id")
        group = await self._backend.get_group_snapshot(gid)
        if group is not None:
            _check_members(group, list(request.snapshot_ids))
        await self._gate.rpc(request, [gid], lambda: self._backend.delete_group_snapshot(gid))
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()

    async def GetVolumeGroupSnapshot(
        self, request: csi_pb2.GetVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        gid = v.required_id(request.group_snapshot_id, "group_snapshot_id")
        group = await self._backend.get_group_snapshot(gid)
        if group is None:
            raise NotFound(f"group snapshot {gid} does not exist")
        _check_members(group, list(request.snapshot_ids))
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=group_message(group))
