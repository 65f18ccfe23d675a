"""The loop_config struct handed to LOOP_CONFIGURE (layout from linux/loop.h)."""

from __future__ import annotations

import struct

from csi.host import loopctl


def test_loop_config_layout() -> None:
    raw = loopctl.pack_config(7, "/pool/volumes/v-loop-abc.img", direct_io=True)
    assert len(raw) == 304  # u32 fd, u32 block_size, loop_info64 (232), u64 reserved[8]
    fd, block_size = struct.unpack_from("<II", raw, 0)
    assert (fd, block_size) == (7, 0)
    # loop_info64: 5 u64 (device, inode, rdevice, offset, sizelimit), then u32 number,
    # encrypt_type, encrypt_key_size, flags.
    flags = struct.unpack_from("<I", raw, 8 + 40 + 12)[0]
    assert flags == loopctl.LO_FLAGS_DIRECT_IO
    name = raw[8 + 56 : 8 + 56 + 64]
    assert name.rstrip(b"\0") == b"/pool/volumes/v-loop-abc.img"
    assert struct.unpack_from("<I", loopctl.pack_config(7, "x", direct_io=False), 60)[0] == 0
    ro = loopctl.pack_config(7, "/dev/loop3", direct_io=False, block_size=4096, read_only=True)
    assert struct.unpack_from("<II", ro, 0) == (7, 4096)
    assert struct.unpack_from("<I", ro, 60)[0] == loopctl.LO_FLAGS_READ_ONLY


def test_long_file_names_are_truncated_not_overflowed() -> None:
    raw = loopctl.pack_config(3, "/" + "a" * 200, direct_io=False)
    assert len(raw) == 304
    assert raw[64 : 64 + 64].endswith(b"\0")  # 63 bytes at most, NUL-terminated
