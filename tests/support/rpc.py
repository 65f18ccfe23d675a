"""CSI request pieces the tests build, and the gRPC codes calls answer with."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from csi.v1 import csi_pb2

AM = csi_pb2.VolumeCapability.AccessMode
SNW = AM.SINGLE_NODE_WRITER
SNSW = AM.SINGLE_NODE_SINGLE_WRITER
SNRO = AM.SINGLE_NODE_READER_ONLY


def mount_cap(fs: str = "", mode: int = SNW, flags: tuple[str, ...] = (), group: str = "") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs, mount_flags=list(flags), volume_mount_group=group),
        access_mode=AM(mode=mode),  # type: ignore[arg-type]
    )


def block_cap(mode: int = SNW) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=AM(mode=mode),  # type: ignore[arg-type]
    )


def code_of(fn: object, *args: object, **kw: object) -> grpc.StatusCode:
    """The status code a (blocking) call fails with, OK if it succeeds."""
    try:
        fn(*args, **kw)  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


async def expect(call: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Await an async call that must fail with ``code``; the error, for more checks."""
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call
    assert ei.value.code() == code, ei.value.details()
    return ei.value
