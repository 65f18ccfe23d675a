from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from csi.errors import InvalidArgument, OutOfRange
from csi.model import AccessType, Capability, Mode
from csi.services import validation as v
from csi.v1 import csi_pb2
from tests.support.rpc import block_cap, mount_cap

MiB = 1024**2
GiB = 1024**3
AM = csi_pb2.VolumeCapability.AccessMode
FORBIDDEN = [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)]


def cr(required: int = 0, limit: int = 0) -> csi_pb2.CapacityRange:
    return csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit)


# -- names ------------------------------------------------------------------------------


def test_empty_name_is_required() -> None:
    with pytest.raises(InvalidArgument, match="name is required"):
        v.name("")


def test_name_of_128_bytes_multibyte_is_accepted() -> None:
    name = "ü" * 64
    assert len(name.encode()) == 128
    assert v.name(name) == name


def test_name_of_129_bytes_is_refused() -> None:
    name = "ü" * 64 + "x"
    with pytest.raises(InvalidArgument, match="longer than 128 bytes"):
        v.name(name)
    # 43 three-byte characters are 129 bytes but only 43 characters.
    with pytest.raises(InvalidArgument):
        v.name("€" * 43)


@pytest.mark.parametrize("cp", [0x0000, 0x0008, 0x000B, 0x000C, 0x000E, 0x001F, 0x007F, 0x009F])
def test_forbidden_control_range_boundaries(cp: int) -> None:
    with pytest.raises(InvalidArgument, match=f"U\\+{cp:04X}"):
        v.name(f"pvc{chr(cp)}x")


@pytest.mark.parametrize("cp", [0x0009, 0x000A, 0x000D, 0x0020, 0x007E, 0x00A0, 0x00FF])
def test_allowed_characters_next_to_the_ranges(cp: int) -> None:
    assert v.name(f"pvc{chr(cp)}x") == f"pvc{chr(cp)}x"


@pytest.mark.parametrize("s", [chr(0xD800), f"a{chr(0xDFFF)}b", chr(0xDC80)])
def test_lone_surrogates_are_refused(s: str) -> None:
    with pytest.raises(InvalidArgument, match="forbidden"):
        v.name(s)


def test_name_uses_the_field_name_in_messages() -> None:
    with pytest.raises(InvalidArgument, match=r"^snapshot name is required$"):
        v.name("", "snapshot name")


ALLOWED_CHARS = st.characters(blacklist_categories=("Cs",)).filter(lambda c: ord(c) not in FORBIDDEN)


@settings(database=None, max_examples=200)
@given(st.text(ALLOWED_CHARS, min_size=1, max_size=128))
def test_any_allowed_text_up_to_128_bytes_passes(s: str) -> None:
    assume(len(s.encode("utf-8")) <= 128)
    assert v.name(s) == s


@settings(database=None, max_examples=200)
@given(st.text(ALLOWED_CHARS, max_size=60), st.sampled_from(FORBIDDEN), st.text(ALLOWED_CHARS, max_size=60))
def test_any_text_with_a_forbidden_char_fails(a: str, cp: int, b: str) -> None:
    with pytest.raises(InvalidArgument):
        v.name(a + chr(cp) + b)


def test_required_id() -> None:
    assert v.required_id("v-loop-x", "volume_id") == "v-loop-x"
    with pytest.raises(InvalidArgument, match="volume_id is required"):
        v.required_id("", "volume_id")
    with pytest.raises(InvalidArgument, match="not a valid ID"):
        v.required_id("x" * 129, "volume_id")
    with pytest.raises(InvalidArgument, match="not a valid ID"):
        v.required_id("v-\x00", "volume_id")


# -- parameters ---------------------------------------------------------------------------

ALLOWED = {**v.COMMON, "elv.csi.dev/provisioning": frozenset({"thin", "thick"})}


def test_parameters_allow_list() -> None:
    params = {
        "csi.storage.k8s.io/fstype": "xfs",
        "elv.csi.dev/provisioning": "thick",
        "csi.storage.k8s.io/pvc/name": "a",
    }
    assert v.parameters(params, ALLOWED) == params


def test_unknown_parameter_key_is_refused_with_the_allowed_keys() -> None:
    with pytest.raises(InvalidArgument, match="unknown parameters key 'mkfsOptions'") as ei:
        v.parameters({"mkfsOptions": "-E nodiscard"}, ALLOWED)
    assert "elv.csi.dev/provisioning" in ei.value.message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("csi.storage.k8s.io/fstype", "btrfs"),
        ("csi.storage.k8s.io/fstype", "ext4 "),
        ("csi.storage.k8s.io/fstype", ""),
        ("elv.csi.dev/provisioning", "Thick"),
        ("elv.csi.dev/provisioning", "thin,thick"),
    ],
)
def test_bad_parameter_values_are_refused(key: str, value: str) -> None:
    with pytest.raises(InvalidArgument, match="is not one of"):
        v.parameters({key: value}, ALLOWED)


def test_parameter_map_limit_is_4_KiB() -> None:
    key = "csi.storage.k8s.io/pvc/name"
    at_limit = {key: "x" * (4096 - len(key))}
    assert v.parameters(at_limit, ALLOWED) == at_limit
    over = {key: "x" * (4097 - len(key))}
    with pytest.raises(InvalidArgument, match="larger than 4096 bytes"):
        v.parameters(over, ALLOWED)
    # bytes, not characters
    over_mb = {key: "é" * (2049 - len(key) // 2)}
    with pytest.raises(InvalidArgument, match="larger than 4096 bytes"):
        v.string_map(over_mb, "secrets")


def test_string_map_refuses_nul() -> None:
    with pytest.raises(InvalidArgument, match="NUL"):
        v.string_map({"a": "b\x00c"}, "secrets")
    with pytest.raises(InvalidArgument, match="NUL"):
        v.string_map({"a\x00": "b"}, "secrets")


# -- capabilities -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [AM.MULTI_NODE_READER_ONLY, AM.MULTI_NODE_SINGLE_WRITER, AM.MULTI_NODE_MULTI_WRITER])
@pytest.mark.parametrize("make", [mount_cap, block_cap])
def test_multi_node_is_refused_with_a_clear_message(mode: int, make) -> None:
    with pytest.raises(InvalidArgument) as ei:
        v.capability(make(mode=mode))
    msg = ei.value.message
    assert "multi-node access modes are not supported" in msg
    assert "SINGLE_NODE" in msg
    assert "ReadWriteOnce" in msg


def test_missing_access_type() -> None:
    cap = csi_pb2.VolumeCapability(access_mode=AM(mode=AM.SINGLE_NODE_WRITER))
    assert v.capability_problem(cap) == "volume_capability needs an access type (block or mount)"
    with pytest.raises(InvalidArgument, match="needs an access type"):
        v.capability(cap)


def test_missing_access_mode() -> None:
    cap = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume())
    with pytest.raises(InvalidArgument, match="access_mode is missing"):
        v.capability(cap)


def test_unknown_fs_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="filesystem 'btrfs' is not supported; use one of: ext4, xfs"):
        v.capability(mount_cap(fs="btrfs"))


@pytest.mark.parametrize(
    "flag",
    [
        "noatime,dev=x",
        "context=system_u:object_r:container_file_t:s0",
        'context="system_u:object_r:x"',
        "data=ordered,dev=/dev/sda",
        "dev",
        "suid",
        "exec",
        "bind",
        "remount",
        "loop",
        "user_xattr",
        "NOATIME",
        " noatime",
        "",
    ],
)
def test_mount_flags_outside_the_allow_list_are_refused(flag: str) -> None:
    with pytest.raises(InvalidArgument, match="is not allowed; allowed flags"):
        v.capability(mount_cap(flags=("noatime", flag)))


@pytest.mark.parametrize("flag", sorted(v.MOUNT_FLAGS))
def test_allowed_mount_flags(flag: str) -> None:
    c = v.capability(mount_cap(fs="xfs", flags=(flag,)))
    assert c.mount_flags == (flag,)


def test_volume_mount_group_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"^volume_capability: volume_mount_group is not supported$"):
        v.capability(mount_cap(group="1000"))


def test_capability_result() -> None:
    c = v.capability(mount_cap(mode=AM.SINGLE_NODE_READER_ONLY, fs="xfs", flags=("ro", "noatime")))
    assert c == Capability(AccessType.MOUNT, Mode.SINGLE_NODE_READER_ONLY, "xfs", ("ro", "noatime"))
    b = v.capability(block_cap(mode=AM.SINGLE_NODE_MULTI_WRITER))
    assert b == Capability(AccessType.BLOCK, Mode.SINGLE_NODE_MULTI_WRITER, None, ())
    # An empty fs_type means "the default", which is recorded as None.
    assert v.capability(mount_cap()).fs_type is None


def test_capabilities_required() -> None:
    with pytest.raises(InvalidArgument, match="volume_capabilities is required"):
        v.capabilities([])


def test_mixing_block_and_mount_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="mixes block and mount"):
        v.capabilities([mount_cap(), block_cap()])


def test_two_filesystems_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="more than one filesystem"):
        v.capabilities([mount_cap(fs="ext4"), mount_cap(fs="xfs")])
    # The same filesystem twice, or once plus the default, is fine.
    assert len(v.capabilities([mount_cap(fs="xfs"), mount_cap(mode=AM.SINGLE_NODE_READER_ONLY)])) == 2


# -- size ---------------------------------------------------------------------------------


def size(required: int = 0, limit: int = 0, *, minimum: int = MiB, granularity: int = MiB) -> int:
    return v.size(cr(required, limit), minimum=minimum, granularity=granularity)


def test_size_both_unset_is_the_default() -> None:
    assert size() == GiB
    assert v.size(None, minimum=MiB, granularity=MiB) == GiB
    assert v.size(None, minimum=MiB, granularity=MiB, default=5 * MiB) == 5 * MiB


def test_size_required_exact_and_rounded_up() -> None:
    assert size(10 * MiB) == 10 * MiB
    assert size(10 * MiB + 1) == 11 * MiB
    assert size(1) == MiB


def test_size_respects_the_minimum() -> None:
    assert size(MiB, minimum=300 * MiB) == 300 * MiB
    assert size(minimum=2 * GiB) == 2 * GiB


def test_size_required_zero_with_a_limit() -> None:
    assert size(0, 100 * MiB) == 100 * MiB  # below the default: the limit
    assert size(0, 10 * GiB) == GiB  # above the default: the default


def test_size_required_equals_limit() -> None:
    assert size(100 * MiB, 100 * MiB) == 100 * MiB


def test_size_limit_below_required_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="limit_bytes is smaller than required_bytes"):
        size(100 * MiB, 99 * MiB)


@pytest.mark.parametrize(("required", "limit"), [(-1, 0), (0, -1), (-MiB, -MiB)])
def test_size_negative_is_invalid(required: int, limit: int) -> None:
    with pytest.raises(InvalidArgument, match="must not be negative"):
        size(required, limit)


def test_size_minimum_above_limit_is_out_of_range() -> None:
    with pytest.raises(OutOfRange, match="limit_bytes=104857600"):
        size(MiB, 100 * MiB, minimum=300 * MiB)
    with pytest.raises(OutOfRange):
        size(0, 100 * MiB, minimum=300 * MiB)


def test_size_rounding_above_limit_is_out_of_range() -> None:
    # No multiple of 1 MiB lies in [1 MiB + 1, 1.5 MiB].
    with pytest.raises(OutOfRange):
        size(MiB + 1, MiB + MiB // 2)


def test_size_required_zero_limit_not_a_multiple_fits_below_the_limit() -> None:
    got = size(0, MiB + MiB // 2)  # 1.5 MiB: 1 MiB satisfies minimum, granularity and limit
    assert got == MiB


SIZES = st.integers(min_value=0, max_value=1 << 44)


@settings(database=None, max_examples=500)
@given(
    required=SIZES,
    limit=SIZES,
    minimum=st.integers(min_value=0, max_value=1 << 32),
    granularity=st.sampled_from([1, 512, 4096, MiB, 4 * MiB, 3 * MiB + 7]),
)
def test_size_properties(required: int, limit: int, minimum: int, granularity: int) -> None:
    try:
        got = v.size(cr(required, limit), minimum=minimum, granularity=granularity)
    except InvalidArgument:
        assert required and limit and limit < required
        return
    except OutOfRange:
        assert limit
        # Nothing that is >= required, >= minimum and a multiple of the granularity fits.
        assert v.round_up(max(required, minimum, 1), granularity) > limit or (
            not required and v.round_up(max(min(GiB, limit), minimum), granularity) > limit
        )
        return
    assert got >= required
    assert got >= minimum
    assert got % granularity == 0
    assert got > 0
    if limit:
        assert got <= limit
    if not required and not limit:
        assert got == v.round_up(max(GiB, minimum), granularity)


def test_round_up_and_fs_minimum() -> None:
    assert v.round_up(0, MiB) == 0
    assert v.round_up(1, MiB) == MiB
    assert v.round_up(MiB, MiB) == MiB
    assert v.fs_minimum("xfs") == 300 * MiB
    assert v.fs_minimum("ext4") == 16 * MiB
    assert v.fs_minimum(None) == 0


def test_access_modes_are_numbered_as_the_spec_numbers_them() -> None:
    # csi.model copies the numbers so that it needs nothing of csi.v1.
    for m in Mode:
        assert m.value == csi_pb2.VolumeCapability.AccessMode.Mode.Value(m.name)
