"""Concurrency: retry storms, and a state machine of random RPC sequences,
restarts and retries checked against a model (hypothesis.stateful)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from csi.v1 import csi_pb2
from tests.support import observe
from tests.support.driver import Driver, MiB
from tests.support.machine import DriverMachine, code_and_id, run_machine
from tests.support.rpc import code_of, mount_cap


def test_identical_creates_make_one_volume(driver: Driver) -> None:
    req = csi_pb2.CreateVolumeRequest(
        name="storm", volume_capabilities=[mount_cap()], capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB)
    )
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda _: code_and_id(driver, req), range(64)))
    ids = {vid for code, vid in results if code == grpc.StatusCode.OK}
    codes = {code for code, _ in results}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED}, codes
    assert len(ids) == 1
    vols = os.listdir(os.path.join(driver.pool, "volumes"))
    assert len(vols) == 2, vols  # one image, one metadata file
    vid = ids.pop()
    staging = driver.path("st", "storm")
    os.makedirs(staging)
    stage = csi_pb2.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging, volume_capability=mount_cap())
    with ThreadPoolExecutor(16) as pool:
        codes = set(pool.map(lambda _: code_of(driver.node.NodeStageVolume, stage), range(32)))
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED}
    image = os.path.realpath(os.path.join(driver.pool, "volumes", vid + ".img"))
    assert len([x for x in observe.loops() if x.backing_file == image]) == 1, "one loop device per volume"
    assert len(observe.stack(staging)) == 1, "one mount per staging path"
    driver.unstage(vid, staging)
    driver.delete(vid)


@pytest.mark.timeout(1200)
def test_state_machine() -> None:
    run_machine(DriverMachine, int(os.environ.get("ELV_SM_EXAMPLES", "12")), 25)
