"""The crash test's classification of a kill by the command it cut."""

from __future__ import annotations

from csi.v1 import csi_pb2
from tests.support.crash import cut_phase


def test_a_kill_is_classified_by_the_last_command_whether_run_alone_or_in_an_lvm_shell() -> None:
    req = csi_pb2.CreateVolumeRequest(name="v")
    own = 'msg="exec /usr/sbin/lvm lvcreate -n x"\nmsg="exec mkfs.ext4 -q /dev/x"\n'
    assert cut_phase("CreateVolume", req, own) == "create/mkfs"
    shell = 'msg="exec mkfs.ext4 -q /dev/x"\nmsg="shell lvm lvchange --addtag elv.formatted=ext4 vg/x"\n'
    assert cut_phase("DeleteVolume", csi_pb2.DeleteVolumeRequest(), shell) == "delete/lvchange"
    assert cut_phase("CreateVolume", req, "") == "create/in-process"
