"""Identity and GroupController services over a real grpc.aio server."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

import csi
from csi.config import Config, Mode
from csi.errors import Aborted
from csi.services.gate import Gate
from csi.services.group import GroupControllerService
from csi.services.identity import IdentityService
from csi.v1 import csi_pb2, csi_pb2_grpc
from tests.support.fakes import FakeBackend
from tests.support.rpc import expect

S = grpc.StatusCode
Cap = csi_pb2.PluginCapability


async def identity(serve, config: Config, backend: FakeBackend) -> csi_pb2_grpc.IdentityStub:
    svc = IdentityService(config, backend, group_snapshots=True)
    return csi_pb2_grpc.IdentityStub(await serve((csi_pb2_grpc.add_IdentityServicer_to_server, svc)))


# -- Identity -----------------------------------------------------------------------------------


async def test_get_plugin_info(serve, config: Config) -> None:
    stub = await identity(serve, config, FakeBackend())
    resp = await stub.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert resp.name == "elv.csi.dev"
    assert resp.vendor_version == csi.__version__
    assert resp.manifest["backend"] == "fake"
    assert resp.manifest["mode"] == "all"


async def test_plugin_capabilities(serve, config: Config) -> None:
    stub = await identity(serve, config, FakeBackend())
    resp = await stub.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in resp.capabilities if c.HasField("service")}
    assert services == {
        Cap.Service.CONTROLLER_SERVICE,
        Cap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
        Cap.Service.GROUP_CONTROLLER_SERVICE,
    }
    expansion = [c.volume_expansion.type for c in resp.capabilities if c.HasField("volume_expansion")]
    assert expansion == [Cap.VolumeExpansion.ONLINE]


async def test_node_only_plugin_does_not_advertise_controllers(serve, config: Config) -> None:
    node_only = dataclasses.replace(config, mode=Mode.NODE)
    stub = await identity(serve, node_only, FakeBackend())
    resp = await stub.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in resp.capabilities if c.HasField("service")}
    assert services == {Cap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS}


async def test_probe_ready(serve, config: Config) -> None:
    backend = FakeBackend()
    stub = await identity(serve, config, backend)
    resp = await stub.Probe(csi_pb2.ProbeRequest())
    assert resp.ready.value is True
    assert backend.methods() == ["probe"]


async def test_probe_unready_is_failed_precondition(serve, config: Config) -> None:
    backend = FakeBackend(ready=False)
    stub = await identity(serve, config, backend)
    err = await expect(stub.Probe(csi_pb2.ProbeRequest()), S.FAILED_PRECONDITION)
    assert err.details() == "the fake pool is still starting"


async def test_probe_unexpected_error_is_internal(serve, config: Config) -> None:
    backend = FakeBackend()
    backend.raise_on["probe"] = OSError("EIO")
    stub = await identity(serve, config, backend)
    await expect(stub.Probe(csi_pb2.ProbeRequest()), S.INTERNAL)


# -- GroupController --------------------------------------------------------------------------------


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def group(serve, backend: FakeBackend) -> csi_pb2_grpc.GroupControllerStub:
    svc = GroupControllerService(backend, Gate())
    return csi_pb2_grpc.GroupControllerStub(await serve((csi_pb2_grpc.add_GroupControllerServicer_to_server, svc)))


async def test_group_capabilities(group) -> None:
    RPC = csi_pb2.GroupControllerServiceCapability.RPC
    resp = await group.GroupControllerGetCapabilities(csi_pb2.GroupControllerGetCapabilitiesRequest())
    assert [c.rpc.type for c in resp.capabilities] == [RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]


async def test_group_snapshot_takes_csi_snapshotters_metadata(group, backend: FakeBackend) -> None:
    """csi-snapshotter --extra-create-metadata adds the group's names; they were refused."""
    a = backend.add_volume("a")
    meta = {
        "csi.storage.k8s.io/volumegroupsnapshot/name": "grp",
        "csi.storage.k8s.io/volumegroupsnapshot/namespace": "default",
        "csi.storage.k8s.io/volumegroupsnapshotcontent/name": "groupsnapcontent-1",
    }
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="grp-m", source_volume_ids=[a.id], parameters=meta)
    assert (await group.CreateVolumeGroupSnapshot(req)).group_snapshot.ready_to_use
    # A single snapshot's metadata key is not a group's.
    bad = {"csi.storage.k8s.io/volumesnapshot/name": "x"}
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="grp-n", source_volume_ids=[a.id], parameters=bad)
    await expect(group.CreateVolumeGroupSnapshot(req), S.INVALID_ARGUMENT)


async def test_group_snapshot_lifecycle(group, backend: FakeBackend) -> None:
    a, b = backend.add_volume("a"), backend.add_volume("b")
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="grp-1", source_volume_ids=[b.id, a.id])
    created = (await group.CreateVolumeGroupSnapshot(req)).group_snapshot
    assert created.ready_to_use
    assert sorted(s.source_volume_id for s in created.snapshots) == sorted([a.id, b.id])
    assert {s.group_snapshot_id for s in created.snapshots} == {created.group_snapshot_id}
    # Idempotent.
    again = (await group.CreateVolumeGroupSnapshot(req)).group_snapshot
    assert again.group_snapshot_id == created.group_snapshot_id
    gid = created.group_snapshot_id
    member_ids = [s.snapshot_id for s in created.snapshots]
    got = await group.GetVolumeGroupSnapshot(
        csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=gid, snapshot_ids=list(reversed(member_ids)))
    )
    assert got.group_snapshot.group_snapshot_id == gid
    await group.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid, snapshot_ids=member_ids)
    )
    assert backend.groups == {}
    await expect(
        group.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=gid)), S.NOT_FOUND
    )
    # Deleting again is fine.
    await group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid))


@pytest.mark.parametrize(
    "req",
    [
        csi_pb2.CreateVolumeGroupSnapshotRequest(name="", source_volume_ids=["v-fake-" + "0" * 32]),
        csi_pb2.CreateVolumeGroupSnapshotRequest(name="g"),
        csi_pb2.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[""]),
        csi_pb2.CreateVolumeGroupSnapshotRequest(
            name="g", source_volume_ids=["v-fake-" + "0" * 32], parameters={"unknown": "x"}
        ),
    ],
)
async def test_create_group_invalid_argument(group, backend: FakeBackend, req) -> None:
    await expect(group.CreateVolumeGroupSnapshot(req), S.INVALID_ARGUMENT)
    assert backend.called("create_group_snapshot") == []


async def test_group_with_a_missing_volume_is_not_found(group, backend: FakeBackend) -> None:
    a = backend.add_volume("a")
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[a.id, "v-fake-" + "9" * 32])
    await expect(group.CreateVolumeGroupSnapshot(req), S.NOT_FOUND)


async def test_group_member_mismatch_is_invalid_argument(group, backend: FakeBackend) -> None:
    a = backend.add_volume("a")
    created = (
        await group.CreateVolumeGroupSnapshot(
            csi_pb2.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[a.id])
        )
    ).group_snapshot
    wrong = ["s-fake-" + "7" * 32]
    await expect(
        group.GetVolumeGroupSnapshot(
            csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=created.group_snapshot_id, snapshot_ids=wrong)
        ),
        S.INVALID_ARGUMENT,
    )
    await expect(
        group.DeleteVolumeGroupSnapshot(
            csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=created.group_snapshot_id, snapshot_ids=wrong)
        ),
        S.INVALID_ARGUMENT,
    )
    assert backend.called("delete_group_snapshot") == []
    assert created.group_snapshot_id in backend.groups


async def test_group_with_other_members_already_exists(group, backend: FakeBackend) -> None:
    a, b = backend.add_volume("a"), backend.add_volume("b")
    await group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[a.id]))
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[a.id, b.id])
    await expect(group.CreateVolumeGroupSnapshot(req), S.ALREADY_EXISTS)


async def test_creates_of_one_group_name_take_one_gate_key(backend: FakeBackend) -> None:
    # A new group gets a new ID only once it is made, so creates are serialised
    # on the name: a different request for the name is ABORTED, the same one
    # joins, and the group is made once.
    gate = Gate()
    svc = GroupControllerService(backend, gate)
    a, b = backend.add_volume("a"), backend.add_volume("b")
    started, release = asyncio.Event(), asyncio.Event()
    create = backend.create_group_snapshot

    async def slow_create(name: str, volume_ids: list[str]):
        started.set()
        await release.wait()
        return await create(name, volume_ids)

    backend.create_group_snapshot = slow_create  # type: ignore[method-assign]
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[a.id])
    task = asyncio.ensure_future(svc.CreateVolumeGroupSnapshot(req, None))
    await started.wait()
    other = csi_pb2.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[b.id])
    with pytest.raises(Aborted):
        await svc.CreateVolumeGroupSnapshot(other, None)
    joined = asyncio.ensure_future(svc.CreateVolumeGroupSnapshot(req, None))
    await asyncio.sleep(0)
    release.set()
    created = (await task).group_snapshot
    assert (await joined).group_snapshot.group_snapshot_id == created.group_snapshot_id
    assert len(backend.called("create_group_snapshot")) == 1
