"""The Controller service over a real grpc.aio server, with a recording fake backend."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from csi.config import Config
from csi.errors import Aborted
from csi.model import AccessType, Health, Snapshot, Volume, VolumeSpec, ids
from csi.services.controller import ControllerService, paginate
from csi.services.gate import Gate
from csi.v1 import csi_pb2, csi_pb2_grpc
from tests.support.fakes import FakeBackend, GiB, MiB
from tests.support.rpc import block_cap, expect, mount_cap

AM = csi_pb2.VolumeCapability.AccessMode
S = grpc.StatusCode
TOPO = "topology.elv.csi.dev/node"


def create_req(name: str = "pvc-1", **kw) -> csi_pb2.CreateVolumeRequest:
    kw.setdefault("volume_capabilities", [mount_cap()])
    kw.setdefault("capacity_range", csi_pb2.CapacityRange(required_bytes=100 * MiB))
    return csi_pb2.CreateVolumeRequest(name=name, **kw)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def stub(serve, config: Config, backend: FakeBackend) -> csi_pb2_grpc.ControllerStub:
    channel = await serve((csi_pb2_grpc.add_ControllerServicer_to_server, ControllerService(config, backend, Gate())))
    return csi_pb2_grpc.ControllerStub(channel)


# -- CreateVolume -------------------------------------------------------------------------------


async def test_create_volume(stub, backend: FakeBackend) -> None:
    resp = await stub.CreateVolume(
        create_req(parameters={"csi.storage.k8s.io/fstype": "xfs", "csi.storage.k8s.io/pvc/name": "data"})
    )
    vol = resp.volume
    oid = ids.parse(vol.volume_id, "v")
    assert oid is not None and oid.pool == "fake" and oid.may_be_named("pvc-1")
    assert vol.capacity_bytes == 300 * MiB  # xfs needs at least 300 MiB
    assert [dict(t.segments) for t in vol.accessible_topology] == [{TOPO: "node-a"}]
    ((spec,),) = backend.called("create_volume")
    assert spec.fs_type == "xfs"
    assert spec.access == AccessType.MOUNT
    assert spec.parameters == {}  # informational keys do not shape the volume


async def test_created_by_is_recorded_shown_and_part_of_a_retry(stub, backend: FakeBackend) -> None:
    """The Docker plugin marks its volumes: the mark is kept with the volume,
    shown in volume_context, and a same-named request without it (another tool's
    volume) is a different volume, not a silent adoption."""
    made = await stub.CreateVolume(create_req(parameters={"elv.csi.dev/created-by": "docker-plugin"}))
    ((spec,),) = backend.called("create_volume")
    assert spec.parameters == {"elv.csi.dev/created-by": "docker-plugin"}
    assert made.volume.volume_context["elv.csi.dev/created-by"] == "docker-plugin"
    listed = await stub.ListVolumes(csi_pb2.ListVolumesRequest())
    assert listed.entries[0].volume.volume_context["elv.csi.dev/created-by"] == "docker-plugin"
    await expect(stub.CreateVolume(create_req()), S.ALREADY_EXISTS)
    e = await expect(
        stub.CreateVolume(create_req("pvc-2", parameters={"elv.csi.dev/created-by": "me"})), S.INVALID_ARGUMENT
    )
    assert "is not one of: docker-plugin" in (e.details() or "")
    plain = await stub.CreateVolume(create_req("pvc-3"))
    assert "elv.csi.dev/created-by" not in plain.volume.volume_context


async def test_create_volume_is_idempotent(stub, backend: FakeBackend) -> None:
    first = await stub.CreateVolume(create_req())
    second = await stub.CreateVolume(create_req())
    assert first.volume.volume_id == second.volume.volume_id
    assert first.volume.capacity_bytes == second.volume.capacity_bytes == 100 * MiB
    assert len(backend.volumes) == 1


async def test_creates_of_one_name_take_one_gate_key(config: Config, backend: FakeBackend) -> None:
    # A new volume (or snapshot) gets a new ID only once it is made, so creates
    # are serialised on the name: the same request joins the running one, a
    # different one for the name is ABORTED, and one volume is made.
    svc = ControllerService(config, backend, Gate())
    started, release = asyncio.Event(), asyncio.Event()
    create = backend.create_volume

    async def slow_create(spec: VolumeSpec) -> Volume:
        started.set()
        await release.wait()
        return await create(spec)

    backend.create_volume = slow_create  # type: ignore[method-assign]
    first = asyncio.ensure_future(svc.CreateVolume(create_req("same"), None))
    await started.wait()
    joined = asyncio.ensure_future(svc.CreateVolume(create_req("same"), None))
    bigger = create_req("same", capacity_range=csi_pb2.CapacityRange(required_bytes=200 * MiB))
    with pytest.raises(Aborted):
        await svc.CreateVolume(bigger, None)
    release.set()
    made = (await first).volume.volume_id
    assert (await joined).volume.volume_id == made
    other = (await svc.CreateVolume(create_req("other"), None)).volume.volume_id
    assert [s.name for (s,) in backend.called("create_volume")] == ["same", "other"]

    snap_started, snap_release = asyncio.Event(), asyncio.Event()
    snap_create = backend.create_snapshot

    async def slow_snap(name: str, vid: str) -> Snapshot:
        snap_started.set()
        await snap_release.wait()
        return await snap_create(name, vid)

    backend.create_snapshot = slow_snap  # type: ignore[method-assign]
    req = csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=made)
    task = asyncio.ensure_future(svc.CreateSnapshot(req, None))
    await snap_started.wait()
    with pytest.raises(Aborted):
        await svc.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=other), None)
    snap_release.set()
    assert (await task).snapshot.source_volume_id == made


async def test_create_volume_defaults(stub, backend: FakeBackend) -> None:
    resp = await stub.CreateVolume(csi_pb2.CreateVolumeRequest(name="pvc-d", volume_capabilities=[mount_cap()]))
    assert resp.volume.capacity_bytes == GiB
    ((spec,),) = backend.called("create_volume")
    assert spec.fs_type == "ext4"
    assert spec.thick is False


async def test_create_block_volume_has_no_filesystem(stub, backend: FakeBackend) -> None:
    await stub.CreateVolume(create_req(volume_capabilities=[block_cap()]))
    ((spec,),) = backend.called("create_volume")
    assert spec.access == AccessType.BLOCK
    assert spec.fs_type is None


async def test_create_thick_volume(stub, backend: FakeBackend) -> None:
    await stub.CreateVolume(create_req(parameters={"elv.csi.dev/provisioning": "thick"}))
    ((spec,),) = backend.called("create_volume")
    assert spec.thick is True
    assert spec.parameters == {"elv.csi.dev/provisioning": "thick"}


@pytest.mark.parametrize(
    ("req", "words"),
    [
        (create_req(name=""), "name is required"),
        (create_req(volume_capabilities=[]), "volume_capabilities is required"),
        (create_req(volume_capabilities=[mount_cap(mode=AM.MULTI_NODE_MULTI_WRITER)]), "multi-node"),
        (create_req(volume_capabilities=[block_cap(mode=AM.MULTI_NODE_READER_ONLY)]), "multi-node"),
        (create_req(parameters={"fsType": "ext4"}), "unknown parameters key 'fsType'"),
        (create_req(parameters={"elv.csi.dev/provisioning": "fat"}), "is not one of"),
        (
            create_req(volume_capabilities=[mount_cap(fs="xfs")], parameters={"csi.storage.k8s.io/fstype": "ext4"}),
            "the capability asks for xfs but csi.storage.k8s.io/fstype says ext4",
        ),
        (create_req(volume_capabilities=[mount_cap(flags=("noatime,dev=x",))]), "mount flag"),
        (create_req(volume_capabilities=[mount_cap(), block_cap()]), "mixes block and mount"),
        (create_req(capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB, limit_bytes=GiB)), "limit_bytes"),
        (create_req(secrets={"k": "v\x00"}), "NUL"),
        (create_req(name="a\x07b"), "forbidden control character"),
        (create_req(mutable_parameters={"iops": "100"}), "unknown mutable_parameters key"),
        (
            create_req(
                volume_content_source=csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource())
            ),
            "snapshot_id is required",
        ),
    ],
)
async def test_create_volume_invalid_argument_never_reaches_the_backend(
    stub, backend: FakeBackend, req: csi_pb2.CreateVolumeRequest, words: str
) -> None:
    err = await expect(stub.CreateVolume(req), S.INVALID_ARGUMENT)
    assert words in err.details()
    assert backend.called("create_volume") == []


async def test_create_volume_multi_node_message_is_clear(stub) -> None:
    err = await expect(
        stub.CreateVolume(create_req(volume_capabilities=[mount_cap(mode=AM.MULTI_NODE_SINGLE_WRITER)])),
        S.INVALID_ARGUMENT,
    )
    assert "ELV volumes are local to one node" in err.details()
    assert "ReadWriteOnce" in err.details()


async def test_create_volume_out_of_range(stub, backend: FakeBackend) -> None:
    req = create_req(
        volume_capabilities=[mount_cap(fs="xfs")], capacity_range=csi_pb2.CapacityRange(limit_bytes=100 * MiB)
    )
    await expect(stub.CreateVolume(req), S.OUT_OF_RANGE)
    assert backend.called("create_volume") == []


async def test_create_volume_topology_without_this_node_is_resource_exhausted(stub, backend: FakeBackend) -> None:
    req = create_req(
        accessibility_requirements=csi_pb2.TopologyRequirement(
            requisite=[csi_pb2.Topology(segments={TOPO: "node-b"}), csi_pb2.Topology(segments={TOPO: "node-c"})],
            preferred=[csi_pb2.Topology(segments={TOPO: "node-b"})],
        )
    )
    err = await expect(stub.CreateVolume(req), S.RESOURCE_EXHAUSTED)
    assert "node-a" in err.details()
    assert backend.called("create_volume") == []


async def test_create_volume_topology_with_this_node(stub, backend: FakeBackend) -> None:
    req = create_req(
        accessibility_requirements=csi_pb2.TopologyRequirement(
            requisite=[csi_pb2.Topology(segments={TOPO: "node-b"}), csi_pb2.Topology(segments={TOPO: "node-a"})]
        )
    )
    resp = await stub.CreateVolume(req)
    assert resp.volume.volume_id
    assert len(backend.called("create_volume")) == 1


async def test_create_volume_hands_the_limit_to_the_backend(stub, backend: FakeBackend) -> None:
    # The backend's idempotency check (csi.backend.base.check_compatible) needs
    # the limit: a volume of this name larger than it is not the same request.
    rng = csi_pb2.CapacityRange(required_bytes=32 * MiB, limit_bytes=40 * MiB)
    await stub.CreateVolume(create_req(capacity_range=rng))
    await stub.CreateVolume(create_req("pvc-2", capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB)))
    assert [(s.size, s.limit) for (s,) in backend.called("create_volume")] == [(32 * MiB, 40 * MiB), (32 * MiB, 0)]


async def test_create_volume_backend_errors_pass_through(stub, backend: FakeBackend) -> None:
    await stub.CreateVolume(create_req())
    # Same name, incompatible request: the backend says ALREADY_EXISTS.
    await expect(stub.CreateVolume(create_req(volume_capabilities=[block_cap()])), S.ALREADY_EXISTS)
    backend.capacity_bytes = 0
    await expect(stub.CreateVolume(create_req("pvc-big")), S.RESOURCE_EXHAUSTED)


async def test_create_volume_from_snapshot_passes_the_source(stub, backend: FakeBackend) -> None:
    src = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="s-fake-" + "0" * 32)
    )
    resp = await stub.CreateVolume(create_req(volume_content_source=src))
    assert resp.volume.content_source.snapshot.snapshot_id == "s-fake-" + "0" * 32
    ((spec,),) = backend.called("create_volume")
    assert spec.source.kind == "snapshot"


async def test_a_source_on_another_node_asks_for_another_node(stub, backend: FakeBackend) -> None:
    """In a cluster (topology given) a restore or clone of a source this node does
    not hold is RESOURCE_EXHAUSTED, which makes csi-provisioner reschedule;
    NOT_FOUND made it retry on the wrong node forever."""
    here = csi_pb2.Topology(segments={TOPO: "node-a"})
    topo = csi_pb2.TopologyRequirement(requisite=[here], preferred=[here])
    for src in (
        csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="s-fake-" + "1" * 32)
        ),
        csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id="v-fake-" + "1" * 32)),
    ):
        err = await expect(
            stub.CreateVolume(create_req(volume_content_source=src, accessibility_requirements=topo)),
            S.RESOURCE_EXHAUSTED,
        )
        assert "is not on node node-a" in err.details()
    assert backend.called("create_volume") == []
    # A source that is here is fine.
    v = backend.add_volume("src")
    src = csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=v.id))
    await stub.CreateVolume(create_req("pvc-clone", volume_content_source=src, accessibility_requirements=topo))


# -- unexpected errors -----------------------------------------------------------------------


async def test_unexpected_exception_is_internal_and_logged(
    stub, backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.raise_on["create_volume"] = RuntimeError("disk controller exploded: secret-detail")
    with caplog.at_level(logging.INFO, logger="csi.rpc"):
        err = await expect(stub.CreateVolume(create_req()), S.INTERNAL)
    assert err.details() == "internal error in CreateVolume: RuntimeError; see the driver log"
    assert "secret-detail" not in err.details()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "csi.rpc"]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert errors[0].exc_info[0] is RuntimeError
    assert "disk controller exploded" in caplog.text
    assert "Traceback" in caplog.text
    # ... and the one-line summary of the call carries the code.
    summary = [r for r in caplog.records if r.getMessage() == "rpc"]
    assert summary[-1].fields["code"] == "INTERNAL"  # type: ignore[attr-defined]
    assert summary[-1].fields["rpc"] == "CreateVolume"  # type: ignore[attr-defined]


async def test_unexpected_exception_in_a_read_rpc_is_internal(stub, backend: FakeBackend) -> None:
    backend.raise_on["list_volumes"] = KeyError("x")
    err = await expect(stub.ListVolumes(csi_pb2.ListVolumesRequest()), S.INTERNAL)
    assert "KeyError" in err.details()


# -- DeleteVolume ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vid", ["not-an-id", "../../etc/passwd", "v-fake-" + "0" * 31, "v-loop-" + "0" * 32, "s-fake-" + "0" * 32]
)
async def test_delete_volume_with_a_malformed_or_unknown_id_is_ok(stub, backend: FakeBackend, vid: str) -> None:
    await stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    assert backend.called("delete_volume") == [(vid,)]


async def test_delete_volume(stub, backend: FakeBackend) -> None:
    vid = (await stub.CreateVolume(create_req())).volume.volume_id
    await stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    assert backend.volumes == {}
    await stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))  # again: still OK


async def test_delete_volume_requires_an_id(stub, backend: FakeBackend) -> None:
    await expect(stub.DeleteVolume(csi_pb2.DeleteVolumeRequest()), S.INVALID_ARGUMENT)
    await expect(stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="x" * 200)), S.INVALID_ARGUMENT)
    assert backend.called("delete_volume") == []


# -- ListVolumes ------------------------------------------------------------------------------


async def test_list_volumes_bad_token_is_aborted(stub) -> None:
    for token in ("garbage", "s-fake-" + "0" * 32, "v-fake-123"):
        await expect(stub.ListVolumes(csi_pb2.ListVolumesRequest(starting_token=token)), S.ABORTED)


async def test_list_volumes_negative_max_entries(stub) -> None:
    await expect(stub.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=-1)), S.INVALID_ARGUMENT)


@pytest.mark.parametrize("page", [1, 2, 3, 7, 8, 0])
async def test_list_volumes_pagination_walks_every_entry_once(stub, backend: FakeBackend, page: int) -> None:
    for i in range(7):
        backend.add_volume(f"pvc-{i}")
    seen: list[str] = []
    token = ""
    for _ in range(20):
        resp = await stub.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=page, starting_token=token))
        if page:
            assert len(resp.entries) <= page
        seen += [e.volume.volume_id for e in resp.entries]
        token = resp.next_token
        if not token:
            break
    assert seen == sorted(backend.volumes)
    assert len(seen) == len(set(seen)) == 7


async def test_list_volumes_reports_condition(stub, backend: FakeBackend) -> None:
    a = backend.add_volume("a")
    b = backend.add_volume("b")
    c = backend.add_volume("c")
    backend.health_of[a.id] = Health(True, "the volume's backing file is missing")
    resp = await stub.ListVolumes(csi_pb2.ListVolumesRequest())
    cond = {e.volume.volume_id: e.status.volume_condition for e in resp.entries}
    assert cond[a.id].abnormal
    assert cond[a.id].message == "the volume's backing file is missing"
    assert not cond[b.id].abnormal
    assert not cond[c.id].abnormal
    # The controller asks for its own view: not staged on a node is normal there.
    assert {args[1] for args in backend.called("health")} == {False}


def test_paginate_token_survives_deletion() -> None:
    items = [f"v-fake-{i:032x}" for i in range(5)]
    page, nxt = paginate(items, lambda x: x, "", 2, "v")
    assert page == items[:2]
    assert nxt == items[2]
    remaining = [x for x in items if x != items[2]]  # the next entry was deleted meanwhile
    page, nxt = paginate(remaining, lambda x: x, nxt, 2, "v")
    assert page == items[3:5]
    assert nxt == ""


# -- ControllerGetVolume / ValidateVolumeCapabilities -------------------------------------------


async def test_controller_get_volume(stub, backend: FakeBackend) -> None:
    v = backend.add_volume("a", size=5 * GiB)
    resp = await stub.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=v.id))
    assert resp.volume.capacity_bytes == 5 * GiB
    assert not resp.status.volume_condition.abnormal
    await expect(
        stub.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id="v-fake-" + "f" * 32)), S.NOT_FOUND
    )


async def test_validate_unknown_volume_is_not_found(stub) -> None:
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id="v-fake-" + "a" * 32, volume_capabilities=[mount_cap()])
    await expect(stub.ValidateVolumeCapabilities(req), S.NOT_FOUND)


async def test_validate_requires_capabilities(stub, backend: FakeBackend) -> None:
    v = backend.add_volume("a")
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=v.id)
    await expect(stub.ValidateVolumeCapabilities(req), S.INVALID_ARGUMENT)


async def test_validate_supported_capability_is_confirmed(stub, backend: FakeBackend) -> None:
    v = backend.add_volume("a")
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=v.id, volume_capabilities=[mount_cap(fs="ext4")], volume_context={"k": "v"}
    )
    resp = await stub.ValidateVolumeCapabilities(req)
    assert resp.HasField("confirmed")
    assert list(resp.confirmed.volume_capabilities) == [mount_cap(fs="ext4")]
    assert dict(resp.confirmed.volume_context) == {"k": "v"}


@pytest.mark.parametrize(
    "cap",
    [
        mount_cap(mode=AM.MULTI_NODE_MULTI_WRITER),
        block_cap(),  # the volume is a mount volume
        mount_cap(fs="xfs"),  # the volume holds ext4
        mount_cap(flags=("context=x",)),
    ],
)
async def test_validate_unsupported_capability_is_not_confirmed(stub, backend: FakeBackend, cap) -> None:
    v = backend.add_volume("a", fs_type="ext4")
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=v.id, volume_capabilities=[mount_cap(), cap])
    resp = await stub.ValidateVolumeCapabilities(req)
    assert not resp.HasField("confirmed")
    assert resp.message


async def test_validate_unknown_parameters_are_not_confirmed(stub, backend: FakeBackend) -> None:
    v = backend.add_volume("a")
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=v.id, volume_capabilities=[mount_cap()], parameters={"foo": "bar"}
    )
    resp = await stub.ValidateVolumeCapabilities(req)
    assert not resp.HasField("confirmed")
    assert "foo" in resp.message


# -- GetCapacity -----------------------------------------------------------------------------------


async def test_get_capacity(stub, backend: FakeBackend) -> None:
    resp = await stub.GetCapacity(
        csi_pb2.GetCapacityRequest(accessible_topology=csi_pb2.Topology(segments={TOPO: "node-a"}))
    )
    assert resp.available_capacity == 100 * GiB
    assert resp.maximum_volume_size.value == 100 * GiB
    assert resp.minimum_volume_size.value == MiB


async def test_get_capacity_for_a_foreign_topology_is_zero(stub, backend: FakeBackend) -> None:
    resp = await stub.GetCapacity(
        csi_pb2.GetCapacityRequest(accessible_topology=csi_pb2.Topology(segments={TOPO: "node-b"}))
    )
    assert resp.available_capacity == 0
    assert backend.called("capacity") == []


async def test_get_capacity_for_an_unsupported_capability_is_zero(stub, backend: FakeBackend) -> None:
    resp = await stub.GetCapacity(
        csi_pb2.GetCapacityRequest(volume_capabilities=[mount_cap(mode=AM.MULTI_NODE_MULTI_WRITER)])
    )
    assert resp.available_capacity == 0
    assert backend.called("capacity") == []


async def test_get_capacity_unknown_parameter(stub) -> None:
    await expect(stub.GetCapacity(csi_pb2.GetCapacityRequest(parameters={"x": "y"})), S.INVALID_ARGUMENT)


# -- ControllerPublish / Unpublish -------------------------------------------------------------


def publish_req(
    vid: str, node: str = "node-a", readonly: bool = False, cap=None
) -> csi_pb2.ControllerPublishVolumeRequest:
    return csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=node, volume_capability=cap or mount_cap(), readonly=readonly
    )


async def test_controller_publish_records_the_attachment(stub, backend: FakeBackend) -> None:
    v = backend.add_volume("a")
    await stub.ControllerPublishVolume(publish_req(v.id))
    await stub.ControllerPublishVolume(publish_req(v.id))  # idempotent
    assert backend.volumes[v.id].attachments == {"node-a": False}
    assert len(backend.called("set_attachment")) == 1


async def test_controller_publish_to_another_node_is_not_found(stub, backend: FakeBackend) -> None:
    v = backend.add_volume("a")
    err = await expect(stub.ControllerPublishVolume(publish_req(v.id, node="node-b")), S.NOT_FOUND)
    assert "node-b" in err.details()
    assert backend.called("set_attachment") == []


async def test_controller_publish_unknown_volume_is_not_found(stub) -> None:
    await expect(stub.ControllerPublishVolume(publish_req("v-fake-" + "1" * 32)), S.NOT_FOUND)


async def test_controller_publish_readonly_change_is_already_exists(stub, backend: FakeBackend) -> None:
    v = backend.add_volume("a")
    await stub.ControllerPublishVolume(publish_req(v.id, readonly=False))
    err = await expect(stub.ControllerPublishVolume(publish_req(v.id, readonly=True)), S.ALREADY_EXISTS)
    assert "readonly=False" in err.details()
    assert backend.volumes[v.id].attachments == {"node-a": False}


async def test_a_publish_checks_the_attachment_under_the_lock(
    stub, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second publish with another readonly, whose read of the volume is
    slow, must not act on that read after the first publish has recorded its
    attachment: it is refused (ABORTED while the first runs, ALREADY_EXISTS
    after), never let through to overwrite the first."""
    v = backend.add_volume("a")
    read, record = backend.get_volume, backend.set_attachment
    reads = 0

    async def slow_read(volume_id: str) -> Volume | None:
        nonlocal reads
        reads += 1
        got = await read(volume_id)
        if reads == 2:
            await asyncio.sleep(0.3)  # the second publish's read, acted on late
        return got

    async def slow_record(volume_id: str, node_id: str, readonly: bool | None) -> Volume:
        await asyncio.sleep(0.1)
        return await record(volume_id, node_id, readonly)

    monkeypatch.setattr(backend, "get_volume", slow_read)
    monkeypatch.setattr(backend, "set_attachment", slow_record)
    first = asyncio.ensure_future(stub.ControllerPublishVolume(publish_req(v.id, readonly=False)))
    await asyncio.sleep(0.02)
    second = await asyncio.gather(
        stub.ControllerPublishVolume(publish_req(v.id, readonly=True)), return_exceptions=True
    )
    await first
    codes = [g.code() if isinstance(g, grpc.aio.AioRpcError) else "OK" for g in second]
    assert codes in ([S.ABORTED], [S.ALREADY_EXISTS]), second
    await expect(stub.ControllerPublishVolume(publish_req(v.id, readonly=True)), S.ALREADY_EXISTS)
    assert backend.volumes[v.id].attachments == {"node-a": False}
    assert len(backend.called("set_attachment")) == 1


async def test_controller_publish_validation(stub, backend: FakeBackend) -> None:
    v = backend.add_volume("a")
    req = csi_pb2.ControllerPublishVolumeRequest(volume_id=v.id, node_id="node-a")
    await expect(stub.ControllerPublishVolume(req), S.INVALID_ARGUMENT)  # no capability
    await expect(stub.ControllerPublishVolume(publish_req(v.id, node="")), S.INVALID_ARGUMENT)
    await expect(stub.ControllerPublishVolume(publish_req(v.id, cap=block_cap())), S.INVALID_ARGUMENT)
    assert backend.called("set_attachment") == []


async def test_controller_unpublish(stub, backend: FakeBackend) -> None:
    v = backend.add_volume("a")
    await stub.ControllerPublishVolume(publish_req(v.id))
    await stub.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=v.id, node_id="node-a"))
    assert backend.volumes[v.id].attachments == {}
    # Unknown volume: OK, nothing to do.
    await stub.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id="v-fake-" + "2" * 32))


# -- Expand / Modify ------------------------------------------------------------------------------


async def test_controller_expand_volume(stub, backend: FakeBackend) -> None:
    v = backend.add_volume("a", size=GiB)
    req = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=v.id, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB + 1)
    )
    resp = await stub.ControllerExpandVolume(req)
    assert resp.capacity_bytes == 2 * GiB + MiB
    assert resp.node_expansion_required
    await expect(stub.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(volume_id=v.id)), S.INVALID_ARGUMENT)
    missing = csi_pb2.ControllerExpandVolumeRequest(
        volume_id="v-fake-" + "3" * 32, capacity_range=csi_pb2.CapacityRange(required_bytes=GiB)
    )
    await expect(stub.ControllerExpandVolume(missing), S.NOT_FOUND)


async def test_modify_volume_unknown_key_is_invalid_argument(stub, backend: FakeBackend) -> None:
    v = backend.add_volume("a")
    req = csi_pb2.ControllerModifyVolumeRequest(volume_id=v.id, mutable_parameters={"iops": "3000"})
    err = await expect(stub.ControllerModifyVolume(req), S.INVALID_ARGUMENT)
    assert "iops" in err.details()
    assert backend.called("modify_volume") == []


async def test_modify_volume(stub, backend: FakeBackend) -> None:
    v = backend.add_volume("a")
    req = csi_pb2.ControllerModifyVolumeRequest(
        volume_id=v.id, mutable_parameters={"elv.csi.dev/provisioning": "thick"}
    )
    await stub.ControllerModifyVolume(req)
    assert backend.volumes[v.id].thick
    missing = csi_pb2.ControllerModifyVolumeRequest(
        volume_id="v-fake-" + "4" * 32, mutable_parameters={"elv.csi.dev/provisioning": "thick"}
    )
    await expect(stub.ControllerModifyVolume(missing), S.NOT_FOUND)


# -- snapshots and capabilities -----------------------------------------------------------------


async def test_snapshots(stub, backend: FakeBackend) -> None:
    v = backend.add_volume("a")
    resp = await stub.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=v.id))
    sid = resp.snapshot.snapshot_id
    assert resp.snapshot.source_volume_id == v.id
    assert resp.snapshot.ready_to_use
    got = await stub.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=sid))
    assert got.snapshot.snapshot_id == sid
    listed = await stub.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=v.id))
    assert [e.snapshot.snapshot_id for e in listed.entries] == [sid]
    await expect(stub.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="", source_volume_id=v.id)), S.INVALID_ARGUMENT)
    await expect(
        stub.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s2", source_volume_id=v.id, parameters={"x": "y"})),
        S.INVALID_ARGUMENT,
    )
    await stub.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
    await expect(stub.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=sid)), S.NOT_FOUND)


async def test_controller_capabilities(stub) -> None:
    RPC = csi_pb2.ControllerServiceCapability.RPC
    resp = await stub.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    types = {c.rpc.type for c in resp.capabilities}
    assert {RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY, RPC.MODIFY_VOLUME} <= types


# -- ControllerModifyVolume of another node's volume ------------------------------------------


class RecordingPeers:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    async def modify(self, volume_id: str, parameters) -> None:  # type: ignore[no-untyped-def]
        self.calls.append((volume_id, dict(parameters)))


async def test_modify_of_a_volume_elsewhere_goes_to_the_peers(serve, config: Config, backend: FakeBackend) -> None:
    peers = RecordingPeers()
    svc = ControllerService(config, backend, Gate(), peers=peers)
    stub = csi_pb2_grpc.ControllerStub(await serve((csi_pb2_grpc.add_ControllerServicer_to_server, svc)))
    here = backend.add_volume("here")
    elsewhere = str(ids.new("v", "fake", "elsewhere"))
    params = {"elv.csi.dev/provisioning": "thick"}
    await stub.ControllerModifyVolume(
        csi_pb2.ControllerModifyVolumeRequest(volume_id=elsewhere, mutable_parameters=params)
    )
    await stub.ControllerModifyVolume(
        csi_pb2.ControllerModifyVolumeRequest(volume_id=here.id, mutable_parameters=params)
    )
    assert peers.calls == [(elsewhere, params)]
    assert [c[0] for c in backend.called("modify_volume")] == [here.id]
    # Parameters are checked before anything leaves the node.
    bad = csi_pb2.ControllerModifyVolumeRequest(volume_id=elsewhere, mutable_parameters={"elv.csi.dev/x": "y"})
    await expect(stub.ControllerModifyVolume(bad), S.INVALID_ARGUMENT)
    assert len(peers.calls) == 1


async def test_modify_without_peers_of_an_unknown_volume_is_not_found(stub) -> None:
    req = csi_pb2.ControllerModifyVolumeRequest(volume_id=str(ids.new("v", "fake", "nope")))
    await expect(stub.ControllerModifyVolume(req), S.NOT_FOUND)
