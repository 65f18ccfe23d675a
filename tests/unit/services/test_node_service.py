"""The Node service over a real grpc.aio server; NodeOps is a recording fake
(or the real NodeOps on a fake backend where no mount is reached)."""

from __future__ import annotations

import grpc
import pytest

from csi.config import Config
from csi.host.fs import FsTool
from csi.host.paths import PathGuard
from csi.host.runner import Runner
from csi.model import AccessType, Mode
from csi.node.ops import NodeOps
from csi.services.gate import Gate
from csi.services.node import NodeService
from csi.v1 import csi_pb2, csi_pb2_grpc
from tests.support.fakes import FakeBackend, FakeNodeOps, FakeViews, GiB
from tests.support.rpc import expect, mount_cap

S = grpc.StatusCode
AM = csi_pb2.VolumeCapability.AccessMode
VID = "v-fake-" + "0" * 32


@pytest.fixture
def ops(config: Config) -> FakeNodeOps:
    return FakeNodeOps(config.kubelet_dir)


@pytest.fixture
async def stub(serve, config: Config, ops: FakeNodeOps) -> csi_pb2_grpc.NodeStub:
    channel = await serve((csi_pb2_grpc.add_NodeServicer_to_server, NodeService(config, ops, Gate())))  # type: ignore[arg-type]
    return csi_pb2_grpc.NodeStub(channel)


@pytest.fixture
def kubelet(config: Config) -> str:
    return config.kubelet_dir


def staging(kubelet: str) -> str:
    return f"{kubelet}/plugins/kubernetes.io/csi/elv.csi.dev/abc/globalmount"


def target(kubelet: str) -> str:
    return f"{kubelet}/pods/uid/volumes/kubernetes.io~csi/pvc/mount"


# -- NodeStageVolume ---------------------------------------------------------------------------


async def test_stage_passes_a_validated_request(stub, ops: FakeNodeOps, kubelet: str) -> None:
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=VID, staging_target_path=staging(kubelet), volume_capability=mount_cap(fs="xfs", flags=("noatime",))
    )
    await stub.NodeStageVolume(req)
    ((vid, path, cap),) = ops.called("stage")
    assert (vid, path) == (VID, staging(kubelet))
    assert cap.access == AccessType.MOUNT
    assert cap.fs_type == "xfs"
    assert cap.mount_flags == ("noatime",)
    assert cap.mode == Mode.SINGLE_NODE_WRITER


@pytest.mark.parametrize(
    "path",
    [
        "relative/globalmount",
        "/var/lib/elsewhere/globalmount",
        "/etc",
        "{k}",
        "{k}/../escape",
        "{k}/a/./b",
        "{k}/a/",
        "{k}x/globalmount",
        "",
    ],
)
async def test_stage_bad_path_is_invalid_argument(stub, ops: FakeNodeOps, kubelet: str, path: str) -> None:
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=VID, staging_target_path=path.format(k=kubelet), volume_capability=mount_cap()
    )
    await expect(stub.NodeStageVolume(req), S.INVALID_ARGUMENT)
    assert ops.calls == []


@pytest.mark.parametrize(
    "req_kw",
    [
        {"volume_id": ""},
        {"volume_capability": None},
        {"volume_capability": mount_cap(mode=AM.MULTI_NODE_MULTI_WRITER)},
        {"volume_capability": mount_cap(flags=("noatime,dev=x",))},
        {"volume_capability": mount_cap(fs="ntfs")},
        {"secrets": {"a": "\x00"}},
    ],
)
async def test_stage_invalid_requests_never_reach_node_ops(stub, ops: FakeNodeOps, kubelet: str, req_kw) -> None:
    kw = {"volume_id": VID, "staging_target_path": staging(kubelet), "volume_capability": mount_cap(), **req_kw}
    if kw["volume_capability"] is None:
        del kw["volume_capability"]
    await expect(stub.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(**kw)), S.INVALID_ARGUMENT)
    assert ops.calls == []


async def test_unstage(stub, ops: FakeNodeOps, kubelet: str) -> None:
    await stub.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=VID, staging_target_path=staging(kubelet)))
    assert ops.called("unstage") == [(VID, staging(kubelet))]
    bad = csi_pb2.NodeUnstageVolumeRequest(volume_id=VID, staging_target_path="/tmp/x")
    await expect(stub.NodeUnstageVolume(bad), S.INVALID_ARGUMENT)
    assert len(ops.calls) == 1


# -- NodePublishVolume ---------------------------------------------------------------------------


def publish_req(kubelet: str, **kw) -> csi_pb2.NodePublishVolumeRequest:
    base = {
        "volume_id": VID,
        "staging_target_path": staging(kubelet),
        "target_path": target(kubelet),
        "volume_capability": mount_cap(),
    }
    base.update(kw)
    return csi_pb2.NodePublishVolumeRequest(**base)


async def test_publish_passes_a_validated_request(stub, ops: FakeNodeOps, kubelet: str) -> None:
    await stub.NodePublishVolume(publish_req(kubelet, readonly=True))
    ((vid, stg, tgt, cap, ro),) = ops.called("publish")
    assert (vid, stg, tgt, ro) == (VID, staging(kubelet), target(kubelet), True)
    assert cap.access == AccessType.MOUNT


@pytest.mark.parametrize("field", ["target_path", "staging_target_path"])
@pytest.mark.parametrize("path", ["pods/uid/mount", "/var/lib/other/pods/uid/mount", "{k}/pods/../../../etc"])
async def test_publish_bad_path_is_invalid_argument(
    stub, ops: FakeNodeOps, kubelet: str, field: str, path: str
) -> None:
    req = publish_req(kubelet, **{field: path.format(k=kubelet)})
    await expect(stub.NodePublishVolume(req), S.INVALID_ARGUMENT)
    assert ops.calls == []


async def test_publish_without_staging_path_is_failed_precondition(stub, ops: FakeNodeOps, kubelet: str) -> None:
    err = await expect(stub.NodePublishVolume(publish_req(kubelet, staging_target_path="")), S.FAILED_PRECONDITION)
    assert "staging_target_path is required" in err.details()
    assert ops.calls == []


async def test_publish_without_capability_is_invalid_argument(stub, ops: FakeNodeOps, kubelet: str) -> None:
    req = publish_req(kubelet)
    req.ClearField("volume_capability")
    await expect(stub.NodePublishVolume(req), S.INVALID_ARGUMENT)
    assert ops.calls == []


async def test_unpublish(stub, ops: FakeNodeOps, kubelet: str) -> None:
    await stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=VID, target_path=target(kubelet)))
    assert ops.called("unpublish") == [(VID, target(kubelet))]
    bad = csi_pb2.NodeUnpublishVolumeRequest(volume_id=VID, target_path="../" + target(kubelet))
    await expect(stub.NodeUnpublishVolume(bad), S.INVALID_ARGUMENT)
    assert len(ops.calls) == 1


async def test_node_op_errors_pass_through(stub, ops: FakeNodeOps, kubelet: str) -> None:
    from csi.errors import InUse

    ops.raise_on["unstage"] = InUse("volume is still published")
    req = csi_pb2.NodeUnstageVolumeRequest(volume_id=VID, staging_target_path=staging(kubelet))
    err = await expect(stub.NodeUnstageVolume(req), S.FAILED_PRECONDITION)
    assert err.details() == "volume is still published"
    ops.raise_on["stage"] = RuntimeError("kaboom")
    req2 = csi_pb2.NodeStageVolumeRequest(
        volume_id=VID, staging_target_path=staging(kubelet), volume_capability=mount_cap()
    )
    await expect(stub.NodeStageVolume(req2), S.INTERNAL)


# -- stats, expand, info --------------------------------------------------------------------------


async def test_volume_stats(stub, ops: FakeNodeOps, kubelet: str) -> None:
    resp = await stub.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id=VID, volume_path=target(kubelet)))
    by_unit = {u.unit: u for u in resp.usage}
    assert by_unit[csi_pb2.VolumeUsage.BYTES].total == 10 * GiB
    assert by_unit[csi_pb2.VolumeUsage.INODES].used == 100
    assert not resp.volume_condition.abnormal
    await expect(stub.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id=VID)), S.INVALID_ARGUMENT)


async def test_expand(stub, ops: FakeNodeOps, kubelet: str) -> None:
    req = csi_pb2.NodeExpandVolumeRequest(
        volume_id=VID, volume_path=target(kubelet), capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB)
    )
    resp = await stub.NodeExpandVolume(req)
    assert resp.capacity_bytes == 2 * GiB
    assert ops.called("expand") == [(VID, target(kubelet), 2 * GiB)]
    neg = csi_pb2.NodeExpandVolumeRequest(
        volume_id=VID, volume_path=target(kubelet), capacity_range=csi_pb2.CapacityRange(required_bytes=-1)
    )
    await expect(stub.NodeExpandVolume(neg), S.INVALID_ARGUMENT)
    await expect(stub.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(volume_id=VID)), S.INVALID_ARGUMENT)
    assert len(ops.called("expand")) == 1


async def test_node_info_and_capabilities(stub, config: Config) -> None:
    info = await stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == "node-a"
    assert dict(info.accessible_topology.segments) == {"topology.elv.csi.dev/node": "node-a"}
    caps = await stub.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    RPC = csi_pb2.NodeServiceCapability.RPC
    assert {c.rpc.type for c in caps.capabilities} >= {
        RPC.STAGE_UNSTAGE_VOLUME,
        RPC.GET_VOLUME_STATS,
        RPC.EXPAND_VOLUME,
    }


# -- with the real NodeOps (no mount is ever reached) ------------------------------------------


@pytest.fixture
async def real_stub(serve, config: Config) -> tuple[csi_pb2_grpc.NodeStub, FakeBackend]:
    backend = FakeBackend()
    ops = NodeOps(backend, PathGuard(config.kubelet_dir), FsTool(Runner()), FakeViews())  # type: ignore[arg-type]
    channel = await serve((csi_pb2_grpc.add_NodeServicer_to_server, NodeService(config, ops, Gate())))
    return csi_pb2_grpc.NodeStub(channel), backend


@pytest.mark.parametrize("path", ["relative/path", "/elsewhere/mount", "{k}/a/../b"])
async def test_volume_stats_bad_path_is_not_found(real_stub, kubelet: str, path: str) -> None:
    stub, backend = real_stub
    vol = backend.add_volume("pvc-stats")
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.id, volume_path=path.format(k=kubelet))
    err = await expect(stub.NodeGetVolumeStats(req), S.NOT_FOUND)
    assert "is not available at" in err.details()
    assert backend.called("find_device") == []


async def test_volume_stats_of_an_unmounted_path_is_not_found(real_stub, kubelet: str) -> None:
    stub, backend = real_stub
    vol = backend.add_volume("pvc-stats")
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.id, volume_path=target(kubelet))
    err = await expect(stub.NodeGetVolumeStats(req), S.NOT_FOUND)
    assert "not staged or published" in err.details()


async def test_volume_stats_of_an_unknown_volume_is_not_found(real_stub, kubelet: str) -> None:
    stub, _ = real_stub
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=VID, volume_path=target(kubelet))
    err = await expect(stub.NodeGetVolumeStats(req), S.NOT_FOUND)
    assert "does not exist" in err.details()


async def test_publish_of_an_unstaged_volume_is_failed_precondition(real_stub, kubelet: str) -> None:
    stub, backend = real_stub
    vol = backend.add_volume("pvc-pub")
    req = publish_req(kubelet, volume_id=vol.id)
    err = await expect(stub.NodePublishVolume(req), S.FAILED_PRECONDITION)
    assert "not staged on this node" in err.details()
    assert backend.called("attach") == []


async def test_stage_with_the_wrong_access_type_is_failed_precondition(real_stub, kubelet: str) -> None:
    stub, backend = real_stub
    vol = backend.add_volume("pvc-blk", access=AccessType.BLOCK, fs_type=None)
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.id, staging_target_path=staging(kubelet), volume_capability=mount_cap()
    )
    await expect(stub.NodeStageVolume(req), S.FAILED_PRECONDITION)
    assert backend.called("attach") == []
