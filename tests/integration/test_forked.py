"""The crash tests restart ``elv serve`` from a pre-imported interpreter
(tests/support/forked.py): such a driver must be a whole driver, one a
SIGKILL ends and a restart recovers, exactly like an exec'd one."""

from __future__ import annotations

import os
import signal

import grpc
import pytest

from csi.v1 import csi_pb2
from tests.support.driver import Driver, leftovers
from tests.support.rpc import mount_cap


def test_a_forked_driver_serves_dies_and_recovers(base: str) -> None:
    d = Driver(base).start()  # the first start is an ordinary exec
    d.fork = True
    try:
        vid = d.create("forked-1")
        d.kill()
        d.start()
        pid = d.proc.pid if d.proc is not None else None
        assert pid is not None and pid != os.getpid()
        listed = [e.volume.volume_id for e in d.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries]
        assert listed == [vid]
        staging = d.path("staging", "forked-1")
        d.stage(vid, staging, mount_cap("ext4"))
        assert d.stop(signal.SIGKILL) == -signal.SIGKILL
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone, not a zombie of ours
        d.start()
        d.stage(vid, staging, mount_cap("ext4"))  # the retry after a kill: idempotent
        d.unstage(vid, staging)
        d.delete(vid)
        with pytest.raises(grpc.RpcError) as e:
            d.controller.ControllerExpandVolume(
                csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 27)
                )
            )
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        rc = d.stop()
    assert rc == 0, d.log()[-3000:]
    assert "Traceback" not in d.log()
    assert d.log().count('msg="serving CSI"') == 3  # each forked driver logs where an exec'd one does
    assert leftovers(base) == []
