"""Hostile input: names, IDs, parameters, mount flags, paths and secrets.

Each case asserts the exact gRPC code and that the call left nothing behind.
"""

from __future__ import annotations

import os

import grpc
import pytest

from csi.v1 import csi_pb2
from tests.support import observe
from tests.support.driver import Driver, MiB, leftovers
from tests.support.rpc import code_of, mount_cap

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
SECRET = "hunter2-s3cr3t-value"
TOKEN = '{"api":{"token":"eyJ-service-account-token","expirationTimestamp":"2030-01-01T00:00:00Z"}}'


def pool_files(d: Driver) -> list[str]:
    return sorted(
        os.path.join(sub, n)
        for sub in ("volumes", "snapshots", "groups", "tmp")
        for n in os.listdir(os.path.join(d.pool, sub))
    )


def create_req(name: str, **kw: object) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        volume_capabilities=[kw.pop("cap", mount_cap())],  # type: ignore[list-item]
        capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "name",
    ["é" * 64, "x" * 128, "../../../etc/passwd", "-rf /", "a\nb", "tab\there", "semi;colon$(id)", "名前" * 21, " "],
)
def test_legal_names_are_hashed_never_used_as_paths(driver: Driver, name: str) -> None:
    vid = driver.controller.CreateVolume(create_req(name)).volume.volume_id
    assert driver.controller.CreateVolume(create_req(name)).volume.volume_id == vid
    assert pool_files(driver) == [f"volumes/{vid}.img", f"volumes/{vid}.json"]
    driver.delete(vid)


@pytest.mark.parametrize(
    "name",
    ["", "x" * 129, "é" * 65, "nul\x00byte", "bell\x07", "esc\x1b[2J", "del\x7f", "c1\x85", "vt\x0b", "ff\x0c", "\x1f"],
)
def test_illegal_names_are_refused(driver: Driver, name: str) -> None:
    assert code_of(driver.controller.CreateVolume, create_req(name)) == INVALID
    assert (
        code_of(driver.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(name=name, source_volume_id="v"))
        == INVALID
    )
    assert pool_files(driver) == []


@pytest.mark.parametrize(
    "bad_id",
    ["../../etc", "/etc/passwd", "v-loop-../../x", "v-loop-" + "A" * 32, "s-loop-" + "0" * 32, "v-loop-0", "-rf"],
)
def test_ids_have_a_strict_format(driver: Driver, bad_id: str) -> None:
    canary = os.path.join(driver.base, "canary")
    with open(canary, "w") as f:
        f.write("keep")
    staging = driver.path("st")
    os.makedirs(staging)
    assert code_of(driver.delete, bad_id) == grpc.StatusCode.OK  # "already gone" is OK
    assert (
        code_of(driver.controller.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id=bad_id))
        == grpc.StatusCode.OK
    )
    assert code_of(driver.stage, bad_id, staging) == NOT_FOUND
    req = csi_pb2.ControllerGetVolumeRequest(volume_id=bad_id)
    assert code_of(driver.controller.ControllerGetVolume, req) == NOT_FOUND
    assert code_of(driver.controller.GetSnapshot, csi_pb2.GetSnapshotRequest(snapshot_id=bad_id)) == NOT_FOUND
    assert code_of(driver.unstage, bad_id, staging) == grpc.StatusCode.OK
    with open(canary) as f:
        assert f.read() == "keep"
    assert pool_files(driver) == []
    assert leftovers(driver.base) == []


@pytest.mark.parametrize(
    "params",
    [
        {"unknown": "x"},
        {"csi.storage.k8s.io/fstype": "btrfs"},
        {"csi.storage.k8s.io/fstype": "ext4,dev=/dev/sda"},
        {"elv.csi.dev/provisioning": "thick; rm -rf /"},
        {"elv.csi.dev/device-class": "x"},  # an LVM key is unknown to the loop backend
    ],
)
def test_parameters_come_from_an_allow_list(driver: Driver, params: dict[str, str]) -> None:
    assert code_of(driver.controller.CreateVolume, create_req("p", parameters=params)) == INVALID
    if "elv.csi.dev/device-class" in params:
        # A StorageClass of the other backend: in a mixed cluster csi-provisioner asks
        # every node, and INVALID_ARGUMENT made it retry for ever. This node has 0 for it.
        got = driver.controller.GetCapacity(csi_pb2.GetCapacityRequest(parameters=params))
        assert got.available_capacity == 0
    else:
        assert code_of(driver.controller.GetCapacity, csi_pb2.GetCapacityRequest(parameters=params)) == INVALID
    assert pool_files(driver) == []


@pytest.mark.parametrize(
    "flag",
    [
        "noatime,dev",
        "context=system_u:object_r:tmp_t",
        "data=ordered,suid",
        "rw,exec",
        "uid=0",
        "loop",
        "bind",
        "--bind",
    ],
)
def test_mount_flag_injection_is_refused(driver: Driver, flag: str) -> None:
    cap = mount_cap(flags=(flag,))
    assert code_of(driver.controller.CreateVolume, create_req("f", cap=cap)) == INVALID
    vid = driver.create("ok")
    staging = driver.path("st", "ok")
    assert code_of(driver.stage, vid, staging, cap) == INVALID
    assert leftovers(driver.base) == []
    driver.delete(vid)


def test_paths_must_be_beneath_the_kubelet_dir(driver: Driver) -> None:
    vid = driver.create("paths")
    outside = os.path.join(driver.base, "outside")
    os.makedirs(outside)
    for path in (
        outside,
        "relative/path",
        driver.kubelet,
        driver.path("a", "..", "..", "outside"),
        driver.path("a") + "/",
        driver.path("a") + "//b",
        "/",
    ):
        req = csi_pb2.NodeStageVolumeRequest(volume_id=vid, staging_target_path=path, volume_capability=mount_cap())
        assert code_of(driver.node.NodeStageVolume, req) == INVALID, path
    # A symlink anywhere beneath the kubelet dir is refused, and its target untouched.
    os.makedirs(driver.path("real"))
    os.symlink(outside, driver.path("link"))
    for path in (driver.path("link"), driver.path("link", "st")):
        req = csi_pb2.NodeStageVolumeRequest(volume_id=vid, staging_target_path=path, volume_capability=mount_cap())
        assert code_of(driver.node.NodeStageVolume, req) == INVALID
    assert os.listdir(outside) == []
    driver.stage(vid, driver.path("real", "st"))
    os.symlink(outside, driver.path("pub"))
    assert code_of(driver.publish, vid, driver.path("real", "st"), driver.path("pub")) == INVALID
    assert code_of(driver.publish, vid, driver.path("real", "st"), driver.path("link", "t")) == INVALID
    assert observe.mounts_under(outside) == []
    # Unpublish of a symlinked target is OK and follows nothing: neither the link
    # (ELV never makes one, so it is not ELV's to remove) nor what it points to is touched.
    driver.unpublish(vid, driver.path("pub"))
    assert os.path.islink(driver.path("pub"))
    assert os.path.isdir(outside) and os.listdir(outside) == []
    os.unlink(driver.path("pub"))
    driver.unstage(vid, driver.path("real", "st"))
    driver.delete(vid)


def test_secrets_never_reach_logs_or_errors(base: str) -> None:
    d = Driver(base, "--log-level", "debug").start()
    secrets = {"password": SECRET, "token": SECRET}
    ctx = {"csi.storage.k8s.io/serviceAccount.tokens": TOKEN, "other": "visible-context"}
    messages: list[str] = []

    def call(fn: object, req: object) -> None:
        try:
            fn(req)  # type: ignore[operator]
        except grpc.RpcError as e:
            messages.append(e.details() or "")

    try:
        vid = d.controller.CreateVolume(create_req("sec", secrets=secrets)).volume.volume_id
        staging, target = d.path("st", "sec"), d.path("t", "sec")
        os.makedirs(staging)
        os.makedirs(os.path.dirname(target))
        c, n = d.controller, d.node
        cap = mount_cap()
        call(c.CreateVolume, create_req("sec2", secrets=secrets, parameters={"bad": "value"}))
        call(
            c.ValidateVolumeCapabilities,
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=vid, volume_capabilities=[cap], secrets=secrets, volume_context=ctx
            ),
        )
        call(
            n.NodeStageVolume,
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=staging, volume_capability=cap, secrets=secrets, volume_context=ctx
            ),
        )
        call(
            n.NodePublishVolume,
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path=staging,
                target_path=target,
                volume_capability=cap,
                secrets=secrets,
                volume_context=ctx,
            ),
        )
        call(
            n.NodePublishVolume,
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path=staging,
                target_path="/etc/elsewhere",
                volume_capability=cap,
                secrets=secrets,
                volume_context=ctx,
            ),
        )
        call(
            c.ControllerExpandVolume,
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB), secrets=secrets
            ),
        )
        call(n.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(volume_id=vid, volume_path=target, secrets=secrets))
        call(c.CreateSnapshot, csi_pb2.CreateSnapshotRequest(name="snap", source_volume_id=vid, secrets=secrets))
        call(c.ListSnapshots, csi_pb2.ListSnapshotsRequest(secrets=secrets))
        call(
            c.ControllerPublishVolume,
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=vid, node_id="node-a", volume_capability=cap, secrets=secrets, volume_context=ctx
            ),
        )
        call(c.ControllerUnpublishVolume, csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, secrets=secrets))
        call(
            c.ControllerModifyVolume,
            csi_pb2.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters={"x": "y"}, secrets=secrets),
        )
        d.unpublish(vid, target)
        d.unstage(vid, staging)
        for s in c.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries:
            c.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=s.snapshot.snapshot_id, secrets=secrets))
        d.delete(vid)
    finally:
        assert d.stop() == 0
    log = d.log()
    assert "visible-context" in log, "the debug log shows requests (so the test can see a leak)"
    assert "rpc=NodeStageVolume" in log
    for leak in (SECRET, "eyJ-service-account-token"):
        assert leak not in log, f"{leak!r} reached the log"
        assert not [m for m in messages if leak in m], f"{leak!r} reached an error message"
    assert leftovers(base) == []
