"""CSI Node service: validate, run the node operation under the volume's gate."""

from __future__ import annotations

from csi.config import Config
from csi.errors import FailedPrecondition, InvalidArgument
from csi.node.ops import NodeOps
from csi.services import Context
from csi.services import validation as v
from csi.services.gate import Gate
from csi.v1 import csi_pb2, csi_pb2_grpc

RPC = csi_pb2.NodeServiceCapability.RPC
CAPABILITIES = (
    RPC.STAGE_UNSTAGE_VOLUME,
    RPC.EXPAND_VOLUME,
    RPC.GET_VOLUME_STATS,
    RPC.VOLUME_CONDITION,
    RPC.SINGLE_NODE_MULTI_WRITER,
)
Usage = csi_pb2.VolumeUsage


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, config: Config, ops: NodeOps, gate: Gate) -> None:
        self._config = config
        self._ops = ops
        self._gate = gate
        self._guard = ops.guard

    async def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: Context
    ) -> csi_pb2.NodeStageVolumeResponse:
        vid = v.required_id(request.volume_id, "volume_id")
        self._guard.relative(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        cap = v.capability(request.volume_capability)
        v.string_map(request.secrets, "secrets")
        await self._gate.rpc(request, [vid], lambda: self._ops.stage(vid, request.staging_target_path, cap))
        return csi_pb2.NodeStageVolumeResponse()

    async def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: Context
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        vid = v.required_id(request.volume_id, "volume_id")
        self._guard.relative(request.staging_target_path, "staging_target_path")
        await self._gate.rpc(request, [vid], lambda: self._ops.unstage(vid, request.staging_target_path))
        return csi_pb2.NodeUnstageVolumeResponse()

    async def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: Context
    ) -> csi_pb2.NodePublishVolumeResponse:
        vid = v.required_id(request.volume_id, "volume_id")
        self._guard.relative(request.target_path, "target_path")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        cap = v.capability(request.volume_capability)
        if not request.staging_target_path:
            raise FailedPrecondition("staging_target_path is required: this driver stages volumes first")
        self._guard.relative(request.staging_target_path, "staging_target_path")
        v.string_map(request.secrets, "secrets")
        await self._gate.rpc(
            request,
            [vid],
            lambda: self._ops.publish(vid, request.staging_target_path, request.target_path, cap, request.readonly),
        )
        return csi_pb2.NodePublishVolumeResponse()

    async def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: Context
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        vid = v.required_id(request.volume_id, "volume_id")
        self._guard.relative(request.target_path, "target_path")
        await self._gate.rpc(request, [vid], lambda: self._ops.unpublish(vid, request.target_path))
        return csi_pb2.NodeUnpublishVolumeResponse()

    async def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: Context
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        vid = v.required_id(request.volume_id, "volume_id")
        if not request.volume_path:
            raise InvalidArgument("volume_path is required")
        st = await self._ops.stats(vid, request.volume_path)
        cond = csi_pb2.VolumeCondition(abnormal=st.health.abnormal, message=st.health.message)
        if st.block:
            usage = [Usage(unit=Usage.BYTES, total=st.total)]
        else:
            usage = [
                Usage(unit=Usage.BYTES, total=st.total, available=st.available, used=st.used),
                Usage(unit=Usage.INODES, total=st.inodes, available=st.inodes_free, used=st.inodes_used),
            ]
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=cond)

    async def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: Context
    ) -> csi_pb2.NodeExpandVolumeResponse:
        vid = v.required_id(request.volume_id, "volume_id")
        if not request.volume_path:
            raise InvalidArgument("volume_path is required")
        if request.HasField("volume_capability"):
            v.capability(request.volume_capability)
        required = request.capacity_range.required_bytes if request.HasField("capacity_range") else 0
        if required < 0:
            raise InvalidArgument("capacity_range values must not be negative")
        size = await self._gate.rpc(request, [vid], lambda: self._ops.expand(vid, request.volume_path, required))
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    async def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[csi_pb2.NodeServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES]
        )

    async def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest, context: Context) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self._config.node_id,
            max_volumes_per_node=self._config.max_volumes_per_node,
            accessible_topology=csi_pb2.Topology(segments={self._config.topology_key: self._config.node_id}),
        )
