"""A volume's name and its ID: CreateVolume is idempotent by name while the
volume exists, a repeat must fit the request, and an ID names one volume for ever."""

from __future__ import annotations

import grpc

from csi.v1 import csi_pb2
from tests.support.driver import Driver, MiB, leftovers
from tests.support.rpc import code_of, mount_cap


def create_req(name: str, required: int, limit: int = 0) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        volume_capabilities=[mount_cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
    )


def test_a_repeat_with_a_smaller_limit_is_already_exists(driver: Driver) -> None:
    vid = driver.create("limited", 64 * MiB)
    # The spec: a volume of this name larger than limit_bytes is not compatible.
    assert code_of(driver.controller.CreateVolume, create_req("limited", 32 * MiB, 48 * MiB)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    assert code_of(driver.controller.CreateVolume, create_req("limited", 32 * MiB, 64 * MiB - 1)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    # Within the limit (or none) it is the same volume.
    assert driver.controller.CreateVolume(create_req("limited", 32 * MiB, 64 * MiB)).volume.volume_id == vid
    assert driver.controller.CreateVolume(create_req("limited", 32 * MiB)).volume.volume_id == vid
    listed = [e.volume for e in driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries]
    assert [(v.volume_id, v.capacity_bytes) for v in listed] == [(vid, 64 * MiB)]
    driver.delete(vid)
    assert leftovers(driver.base) == []
