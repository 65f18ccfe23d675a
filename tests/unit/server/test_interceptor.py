"""The interceptor: every error becomes the right status; a client never sees UNKNOWN."""

from __future__ import annotations

import logging

import grpc
import pytest

from csi import __version__
from csi.config import Config
from csi.errors import Aborted, InUse, NotFound
from csi.server.interceptor import RpcInterceptor, subject
from csi.services.controller import ControllerService
from csi.services.gate import Gate
from csi.services.identity import IdentityService
from csi.v1 import csi_pb2, csi_pb2_grpc
from tests.support.fakes import FakeBackend, MiB

S = grpc.StatusCode
AM = csi_pb2.VolumeCapability.AccessMode


class Scripted(IdentityService):
    """Probe raises whatever the test sets."""

    def __init__(self, config: Config, backend: FakeBackend) -> None:
        super().__init__(config, backend, group_snapshots=True)
        self.exc: BaseException | None = None

    async def Probe(self, request, context):  # type: ignore[no-untyped-def]
        if self.exc is not None:
            raise self.exc
        return await super().Probe(request, context)


class WithoutModify(ControllerService):
    """A servicer that does not implement one RPC (the generated base's stub remains)."""

    ControllerModifyVolume = csi_pb2_grpc.ControllerServicer.ControllerModifyVolume


@pytest.mark.parametrize(
    ("exc", "code", "details"),
    [
        (NotFound("volume v-1 does not exist"), S.NOT_FOUND, "volume v-1 does not exist"),
        (InUse("busy"), S.FAILED_PRECONDITION, "busy"),
        (Aborted("in progress"), S.ABORTED, "in progress"),
        (NotImplementedError(), S.UNIMPLEMENTED, "Probe is not implemented by this driver"),
        (ValueError("oops"), S.INTERNAL, "internal error in Probe: ValueError; see the driver log"),
        (ZeroDivisionError(), S.INTERNAL, "internal error in Probe: ZeroDivisionError; see the driver log"),
    ],
)
async def test_exceptions_become_statuses(serve, config: Config, exc: BaseException, code, details: str) -> None:
    svc = Scripted(config, FakeBackend())
    svc.exc = exc
    interceptor = RpcInterceptor()
    channel = await serve((csi_pb2_grpc.add_IdentityServicer_to_server, svc), interceptor=interceptor)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest())
    assert ei.value.code() == code
    assert ei.value.code() != S.UNKNOWN
    assert ei.value.details() == details


async def test_method_the_servicer_does_not_implement_is_unimplemented(serve, config: Config) -> None:
    backend = FakeBackend()
    channel = await serve((csi_pb2_grpc.add_ControllerServicer_to_server, WithoutModify(config, backend, Gate())))
    req = csi_pb2.ControllerModifyVolumeRequest(volume_id="v-fake-" + "0" * 32)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await csi_pb2_grpc.ControllerStub(channel).ControllerModifyVolume(req)
    assert ei.value.code() == S.UNIMPLEMENTED
    assert backend.calls == []


async def test_service_that_is_not_registered_is_unimplemented(serve, config: Config) -> None:
    channel = await serve(
        (csi_pb2_grpc.add_IdentityServicer_to_server, IdentityService(config, FakeBackend(), group_snapshots=True))
    )
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert ei.value.code() == S.UNIMPLEMENTED


async def test_each_call_gets_one_summary_line_and_the_observer(
    serve, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, str, float]] = []
    backend = FakeBackend()
    channel = await serve(
        (csi_pb2_grpc.add_ControllerServicer_to_server, ControllerService(config, backend, Gate())),
        interceptor=RpcInterceptor(observer=lambda *a: seen.append(a)),
    )
    stub = csi_pb2_grpc.ControllerStub(channel)
    with caplog.at_level(logging.INFO, logger="csi.rpc"):
        await stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="v-fake-" + "0" * 32))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.DeleteVolume(csi_pb2.DeleteVolumeRequest())
    lines = [r for r in caplog.records if r.name == "csi.rpc" and r.getMessage() == "rpc"]
    assert [(r.fields["rpc"], r.fields["code"]) for r in lines] == [  # type: ignore[attr-defined]
        ("DeleteVolume", "OK"),
        ("DeleteVolume", "INVALID_ARGUMENT"),
    ]
    assert lines[0].fields["object"] == "v-fake-" + "0" * 32  # type: ignore[attr-defined]
    assert lines[1].fields["error"] == "volume_id is required"  # type: ignore[attr-defined]
    assert [(m, c) for m, c, _ in seen] == [("DeleteVolume", "OK"), ("DeleteVolume", "INVALID_ARGUMENT")]


async def test_a_broken_observer_does_not_break_the_call(serve, config: Config) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("metrics down")

    channel = await serve(
        (csi_pb2_grpc.add_IdentityServicer_to_server, IdentityService(config, FakeBackend(), group_snapshots=True)),
        interceptor=RpcInterceptor(observer=broken),
    )
    resp = await csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert resp.vendor_version == __version__


def test_subject() -> None:
    assert subject(csi_pb2.NodeStageVolumeRequest(volume_id="v-1")) == "v-1"
    assert subject(csi_pb2.CreateVolumeRequest(name="pvc-1")) == "pvc-1"
    assert subject(csi_pb2.CreateSnapshotRequest(name="s", source_volume_id="v-2")) == "v-2"
    assert subject(csi_pb2.ProbeRequest()) == ""
    assert len(subject(csi_pb2.CreateVolumeRequest(name="x" * 1000))) == 160


async def test_debug_logging_does_not_break_requests(serve, config: Config, caplog: pytest.LogCaptureFixture) -> None:
    """Regression: at DEBUG the request is logged (redacted) before the call; a failure
    there used to escape the interceptor, so clients saw UNKNOWN."""
    backend = FakeBackend()
    interceptor = RpcInterceptor()
    channel = await serve(
        (csi_pb2_grpc.add_ControllerServicer_to_server, ControllerService(config, backend, Gate())),
        interceptor=interceptor,
    )
    cap = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=AM(mode=AM.SINGLE_NODE_WRITER)
    )
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-1",
        volume_capabilities=[cap],
        capacity_range=csi_pb2.CapacityRange(required_bytes=MiB),
        secrets={"password": "hunter2"},
    )
    with caplog.at_level(logging.DEBUG, logger="csi.rpc"):
        resp = await csi_pb2_grpc.ControllerStub(channel).CreateVolume(req)
    assert resp.volume.volume_id
    assert "hunter2" not in caplog.text
