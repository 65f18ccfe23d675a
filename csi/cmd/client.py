"""A small CSI client over the driver's unix socket, for the CLI and the demo.

It speaks CSI exactly as the Kubernetes sidecars do; there is no private API.
"""

from __future__ import annotations

import asyncio
import os
from typing import TypeAlias

import grpc

from csi.v1 import csi_pb2, csi_pb2_grpc

DEFAULT_ENDPOINT = "unix:///run/elv/csi.sock"


class NoDriver(Exception):
    """Nothing answers on the endpoint."""


def endpoint_path(endpoint: str) -> str:
    return endpoint[len("unix://") :] if endpoint.startswith("unix://") else endpoint


class Client:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint if endpoint.startswith("unix://") else "unix://" + endpoint
        self.channel = grpc.aio.insecure_channel(self.endpoint)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    async def wait_ready(self, timeout: float = 10.0) -> csi_pb2.GetPluginInfoResponse:
        """Wait until the driver answers Probe with ready, and return its info."""
        path = endpoint_path(self.endpoint)
        deadline = asyncio.get_running_loop().time() + timeout
        last: Exception | None = None
        while asyncio.get_running_loop().time() < deadline:
            if os.path.exists(path):
                try:
                    probe = await self.identity.Probe(csi_pb2.ProbeRequest(), timeout=2)
                    if not probe.HasField("ready") or probe.ready.value:
                        return await self.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=2)
                except grpc.aio.AioRpcError as e:
                    last = e
            await asyncio.sleep(0.05)
        raise NoDriver(
            f"no CSI driver answered on {self.endpoint}"
            + (f" ({last.details()})" if isinstance(last, grpc.aio.AioRpcError) else "")
        )


Mode: TypeAlias = "csi_pb2.VolumeCapability.AccessMode.Mode.ValueType"


def mount_capability(
    fs_type: str = "ext4", mode: Mode = csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )


def block_capability(
    mode: Mode = csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER,
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )
