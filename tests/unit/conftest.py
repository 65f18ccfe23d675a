from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import configuration

from csi.config import Config
from csi.server.interceptor import RpcInterceptor
from tests.support.paths import DATA

# Hypothesis keeps caches (and, unless disabled, its example database) in
# ./.hypothesis; keep the checkout clean by putting them in the temp dir.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    configuration.set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "elv-unit-hypothesis")

Registration = tuple[Callable[[Any, grpc.aio.Server], None], Any]
Serve = Callable[..., Awaitable[grpc.aio.Channel]]


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture
def config(tmp_path: Path) -> Config:
    kubelet = tmp_path / "kubelet"
    kubelet.mkdir()
    return Config(endpoint=f"unix://{tmp_path}/csi.sock", node_id="node-a", kubelet_dir=str(kubelet))


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """Start a real grpc.aio server on a unix socket with the driver's interceptor.

    ``await serve((csi_pb2_grpc.add_XServicer_to_server, servicer), ...)`` returns
    a channel to it; everything is torn down after the test.
    """
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def start(*registrations: Registration, interceptor: RpcInterceptor | None = None) -> grpc.aio.Channel:
        server = grpc.aio.server(interceptors=[interceptor or RpcInterceptor()])
        for add, servicer in registrations:
            add(servicer, server)
        path = tmp_path / f"s{len(servers)}.sock"
        assert server.add_insecure_port(f"unix://{path}") != 0
        await server.start()
        servers.append(server)
        # A local subchannel pool: closing the channel closes its connection too.
        channel = grpc.aio.insecure_channel(f"unix://{path}", options=[("grpc.use_local_subchannel_pool", 1)])
        channels.append(channel)
        return channel

    yield start
    for ch in channels:
        await ch.close()
    for s in servers:
        await s.stop(None)
