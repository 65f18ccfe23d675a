"""CSI Identity service."""

from __future__ import annotations

from google.protobuf import wrappers_pb2

from csi import __version__
from csi.backend.base import Common
from csi.config import Config
from csi.errors import ElvError, FailedPrecondition
from csi.services import Context
from csi.v1 import csi_pb2, csi_pb2_grpc

Cap = csi_pb2.PluginCapability


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, config: Config, backend: Common, *, group_snapshots: bool) -> None:
        self._config = config
        self._backend = backend
        self._group = group_snapshots

    async def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: Context
    ) -> csi_pb2.GetPluginInfoResponse:
        pools = ",".join(p.pool for p in await self._backend.pool_stats())
        return csi_pb2.GetPluginInfoResponse(
            name=self._config.driver_name,
            vendor_version=__version__,
            manifest={
                "backend": self._backend.kind,
                "mode": self._config.mode.value,
                "node": self._config.node_id,
                "pools": pools,
                "kubelet-dir": self._config.kubelet_dir,
            },
        )

    async def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: Context
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        caps = [
            Cap(service=Cap.Service(type=Cap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
            Cap(volume_expansion=Cap.VolumeExpansion(type=Cap.VolumeExpansion.ONLINE)),
        ]
        if self._config.mode.controller:
            caps.insert(0, Cap(service=Cap.Service(type=Cap.Service.CONTROLLER_SERVICE)))
            if self._group:
                caps.append(Cap(service=Cap.Service(type=Cap.Service.GROUP_CONTROLLER_SERVICE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    async def Probe(self, request: csi_pb2.ProbeRequest, context: Context) -> csi_pb2.ProbeResponse:
        try:
            await self._backend.probe()
        except ElvError as e:
            # The spec's answer for "not healthy"; livenessprobe restarts the container on it.
            raise FailedPrecondition(e.message) from e
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
