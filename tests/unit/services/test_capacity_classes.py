"""GetCapacity for every StorageClass deploy/ ships, on a node of each backend.

csi-provisioner (--enable-capacity) asks every node's driver about every
class of the driver, and retries an error forever without publishing a
CSIStorageCapacity. So a class this node does not serve (the other backend's,
or an LVM device class this node lacks) must answer 0, not INVALID_ARGUMENT;
the scheduler then never puts its volumes here. A key no backend knows is
still an error, and CreateVolume still refuses what it cannot make.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from csi.backend.loop.backend import LoopBackend
from csi.backend.lvm.recovery import recover
from csi.config import Config
from csi.model import DEVICE_CLASS
from csi.services.controller import ControllerService
from csi.services.gate import Gate
from csi.v1 import csi_pb2, csi_pb2_grpc
from tests.support.fake_lvm import CLASSES, FakeLv, FakeLvm, GiB, backend_over
from tests.support.fakes import FakeRunner
from tests.support.paths import REPO
from tests.support.rpc import expect, mount_cap

LVM_CONFIG = f"""
default-class = "thick"
udev = "off"
freeze-dir = "/nonexistent/elv-freeze"
{CLASSES}"""


def storage_classes() -> dict[str, dict[str, str]]:
    with open(os.path.join(REPO, "deploy", "base", "storageclasses.yaml")) as f:
        docs = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "StorageClass"]
    return {d["metadata"]["name"]: dict(d.get("parameters") or {}) for d in docs}


async def loop_backend(tmp_path: Path) -> Any:
    b = LoopBackend(str(tmp_path / "pool"), FakeRunner(), sys_block=str(tmp_path))  # type: ignore[arg-type]
    await b.start()
    return b


async def lvm_backend(tmp_path: Path) -> Any:
    lvm = FakeLvm()
    lvm.add(FakeLv("pool0", "vg0", 2 * GiB, "thin-pool", data_percent=0.0, metadata_percent=5.0))
    b = backend_over(lvm, LVM_CONFIG)
    await recover(b.store, b.wiper)
    return b


@pytest.fixture(params=["loop", "lvm"])
async def node(request: pytest.FixtureRequest, serve, config: Config, tmp_path: Path) -> tuple[str, Any]:
    backend = await (loop_backend if request.param == "loop" else lvm_backend)(tmp_path)
    channel = await serve((csi_pb2_grpc.add_ControllerServicer_to_server, ControllerService(config, backend, Gate())))
    return request.param, csi_pb2_grpc.ControllerStub(channel)


def req(params: dict[str, str]) -> csi_pb2.GetCapacityRequest:
    return csi_pb2.GetCapacityRequest(parameters=params, volume_capabilities=[mount_cap()])


async def test_every_shipped_class_has_capacity_on_its_backend_and_none_elsewhere(node: tuple[str, Any]) -> None:
    backend, stub = node
    classes = storage_classes()
    assert set(classes) == {"elv-loop", "elv-lvm-thick", "elv-lvm-thin"}
    for name, params in classes.items():
        resp = await stub.GetCapacity(req(params))
        if name.startswith(f"elv-{backend}"):
            assert resp.available_capacity > 0, (backend, name)
        else:
            assert resp.available_capacity == 0, (backend, name)


async def test_a_device_class_this_node_lacks_has_no_capacity_but_cannot_be_created(
    node: tuple[str, Any],
) -> None:
    backend, stub = node
    params = {"csi.storage.k8s.io/fstype": "xfs", DEVICE_CLASS: "nvme"}
    assert (await stub.GetCapacity(req(params))).available_capacity == 0
    create = csi_pb2.CreateVolumeRequest(name="pvc-x", volume_capabilities=[mount_cap()], parameters=params)
    err = await expect(stub.CreateVolume(create), grpc.StatusCode.INVALID_ARGUMENT)
    assert DEVICE_CLASS in err.details(), (backend, err.details())


async def test_a_key_no_backend_knows_is_still_invalid(node: tuple[str, Any]) -> None:
    _, stub = node
    await expect(stub.GetCapacity(req({"fstype": "xfs"})), grpc.StatusCode.INVALID_ARGUMENT)
    # A value outside a declared key's set is a typo too, on the backend that declares it.
    await expect(stub.GetCapacity(req({"csi.storage.k8s.io/fstype": "ext3"})), grpc.StatusCode.INVALID_ARGUMENT)
