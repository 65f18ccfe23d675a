"""The idmapped-mount syscall's argument, checked against the kernel ABI (no root)."""

from __future__ import annotations

import ctypes
import os

from csi.host import nsmount


def test_mount_attr_is_the_kernel_struct() -> None:
    # struct mount_attr (MOUNT_ATTR_SIZE_VER0): four __u64, 32 bytes.
    assert ctypes.sizeof(nsmount._MountAttr) == 32
    attr = nsmount._MountAttr(attr_set=nsmount.MOUNT_ATTR_IDMAP, userns_fd=7)
    raw = bytes(attr)
    assert int.from_bytes(raw[0:8], "little") == 0x00100000 and int.from_bytes(raw[24:32], "little") == 7
    assert (nsmount.SYS_MOUNT_SETATTR, nsmount.AT_EMPTY_PATH) == (442, 0x1000)


def test_user_namespace_of_this_process() -> None:
    assert nsmount.user_namespace("self") == os.stat("/proc/self/ns/user").st_ino
    assert nsmount.user_namespace(os.getpid()) == nsmount.user_namespace("self")
