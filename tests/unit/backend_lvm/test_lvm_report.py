"""The LVM report parsers and failure classifiers, on output captured in the
test guest (tests/data/lvm/capture.sh): no root, no LVM."""

from __future__ import annotations

import pytest

from csi.backend.lvm import report
from csi.errors import CommandError, CorruptState
from tests.support.paths import DATA

LVM = DATA / "lvm"


def load(name: str) -> str:
    return (LVM / name).read_text()


def by_name(lvs: list[report.LvInfo]) -> dict[str, report.LvInfo]:
    return {lv.name: lv for lv in lvs}


def test_lvs_mixed_kinds() -> None:
    lvs = by_name(report.parse_lvs(load("lvs-vgfields.json")))
    thick = lvs["elv-v-thick-0123456789abcdef0123456789abcdef"]
    assert thick.size == 33554432
    assert thick.is_origin and thick.active and not thick.thin and not thick.open
    assert thick.tag("elv.owner") == "elv.csi.dev"
    assert report.hex_decode(thick.tag("elv.name") or "") == "name"
    assert (thick.major, thick.minor) == (254, 0)
    assert thick.vg_free == 801112064 and thick.vg_extent_size == 4194304

    thin = lvs["elv-v-thin-fedcba9876543210fedcba9876543210"]
    assert thin.thin and thin.pool == "pool0" and thin.volume_type == "V"
    assert thin.size == 100 * 1024 * 1024  # grown from 96 MiB by lvextend
    assert thin.data_percent == 0.0

    snap = lvs["elv-s-thin-00112233445566778899aabbccddeeff"]
    assert snap.thin and not snap.active and snap.major is None
    assert snap.attr.endswith("k"), "thin snapshots carry the activation-skip flag"
    assert snap.origin == "elv-v-thin-fedcba9876543210fedcba9876543210"
    # Snapshots do not inherit their origin's tags.
    assert snap.tags == ("elv.kind=s", "elv.owner=elv.csi.dev")

    cow = lvs["elv-s-thick-00112233445566778899aabbccddeeff"]
    assert cow.cow_snapshot and cow.origin.startswith("elv-v-thick-") and cow.data_percent == 0.0

    pool = lvs["pool0"]
    assert pool.thin_pool and pool.zero is True and pool.metadata_percent == 10.94
    assert pool.chunk_size == 65536

    foreign = lvs["foreign"]
    assert foreign.tags == () and not foreign.active and foreign.major is None

    assert lvs["mirrored"].segtype == "raid1" and lvs["mirrored"].copy_percent == 100.0
    assert lvs["striped"].segtype == "striped"
    clone = lvs["elv-q-thin-clone"]
    assert clone.thin and clone.origin.startswith("elv-s-thin-") and clone.active


def test_lvs_without_vg_fields() -> None:
    lvs = report.parse_lvs(load("lvs-mixed.json"))
    assert lvs and all(lv.vg_free is None for lv in lvs)


def test_vgs() -> None:
    (vg,) = report.parse_vgs(load("vgs.json"))
    assert (vg.name, vg.size, vg.free, vg.extent_size) == ("elvcap", 1065353216, 801112064, 4194304)
    assert vg.free == vg.free_count * vg.extent_size and vg.pv_count == 2


def test_empty_reports() -> None:
    assert report.parse_lvs(load("lvs-notfound.json")) == []
    assert report.parse_vgs(load("vgs-notfound.json")) == []


def test_garbage_is_corrupt_state() -> None:
    with pytest.raises(CorruptState):
        report.parse_lvs("not json")
    with pytest.raises(CorruptState):
        report.parse_vgs('{"report": 3}')


def err(rc: int, stderr_file: str) -> CommandError:
    return CommandError(["lvm", "x"], rc, b"", (LVM / stderr_file).read_bytes())


def test_classifiers_on_captured_stderr() -> None:
    assert report.not_found(err(5, "vgs-notfound.stderr"))
    assert report.not_found(err(5, "lvs-notfound.stderr"))
    assert report.not_found(err(5, "lvremove-notfound.stderr"))
    assert report.no_space(err(5, "lvcreate-nospace.stderr"))
    assert report.already_exists(err(5, "lvcreate-exists.stderr"))
    # The message alone is not enough: LVM must also have exited 5.
    assert not report.not_found(err(3, "vgs-notfound.stderr"))
    assert not report.not_found(err(5, "lvcreate-nospace.stderr"))
    assert not report.no_space(err(5, "lvs-notfound.stderr"))


@pytest.mark.parametrize("text", ["", "é" * 64, "a,b=c d", "\x01group\x01x", "../../etc"])
def test_hex_round_trip_fits_the_tag_charset(text: str) -> None:
    enc = report.hex_encode(text)
    assert report.hex_decode(enc) == text
    assert enc == "" or report.valid_tag("elv.name=" + enc)


def test_names_and_tags() -> None:
    assert report.valid_name("elv-v-thin-" + "0" * 32)
    for bad in ["-x", ".", "..", "snapshot", "a b", "a/b", "x" * 128, ""]:
        assert not report.valid_name(bad), bad
    assert report.valid_tag("elv.owner=elv.csi.dev")
    assert not report.valid_tag("-x") and not report.valid_tag("a b") and not report.valid_tag("a,b")
    assert report.hex_decode("zz") is None
    assert report.tag_map(("a=b", "c", "d=e=f")) == {"a": "b", "c": "", "d": "e=f"}


def test_lvrename_of_a_vanished_lv_is_not_found() -> None:
    stderr = (
        b'  Existing logical volume "elv-v-thick-dbd6e8dc76af239985c956be610888b3" not found in volume group "vg"\n'
    )
    assert report.not_found(CommandError(["lvm", "lvrename"], 5, b"", stderr))


def test_thin_pool_states() -> None:
    # lvs-pools.json (capture.sh): a pool made with -Z n, a zeroing pool, and a
    # pool with --errorwhenfull y written until it ran out of data space.
    from csi.backend.lvm import capacity

    lvs = by_name(report.parse_lvs(load("lvs-pools.json")))
    nozero, pool0, full = lvs["nozero"], lvs["pool0"], lvs["full"]
    assert nozero.thin_pool and nozero.zero is False, 'LVM prints zero="" for a pool that does not zero'
    assert pool0.zero is True and pool0.when_full == "queue" and nozero.when_full == "queue"
    assert full.zero is True and full.when_full == "error"
    assert full.attr[8] == "D" and full.health == "out_of_data" and full.data_percent == 100.0
    why = capacity.pool_condition(full, 90.0)
    assert why is not None and "out of data space" in why and "fail at once with ENOSPC" in why
    assert capacity.pool_condition(pool0, 90.0) is None and capacity.pool_condition(nozero, 90.0) is None
    assert lvs["filler"].thin and lvs["filler"].pool == "full"
    # Where the field does not apply LVM prints "unknown": not a pool's answer either way.
    assert all(lv.zero is None for lv in report.parse_lvs(load("lvs-mixed.json")) if lv.segtype == "linear")
