from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csi.model import ids

HEX = "0123456789abcdef" * 2


def test_new_and_parse_round_trip() -> None:
    oid = ids.new("v", "loop", "pvc-0d3c0c6e")
    text = str(oid)
    assert text == f"v-loop-{oid.digest}"
    assert len(oid.digest) == 32
    assert ids.parse(text, "v") == oid


@pytest.mark.parametrize("kind", ["v", "s", "g"])
def test_every_kind_round_trips(kind: ids.Kind) -> None:
    oid = ids.new(kind, "vg0", "name")
    assert ids.parse(str(oid), kind) == oid
    assert ids.parse(str(ids.legacy(kind, "vg0", "name")), kind) == ids.legacy(kind, "vg0", "name")


def test_a_name_never_gets_the_same_id_twice() -> None:
    # A volume deleted and made again under its name is another volume: an ID
    # held for the old one must never name the new one.
    made = {str(ids.new("v", "loop", "data")) for _ in range(1000)}
    assert len(made) == 1000
    assert str(ids.legacy("v", "loop", "data")) not in made


def test_every_id_starts_with_its_names_hash() -> None:
    # What lets a client that knows only a name pick the object out of a listing.
    name = "nightly"
    for oid in (ids.new("s", "loop", name), ids.legacy("s", "loop", name)):
        assert oid.digest.startswith(hashlib.sha256(name.encode()).hexdigest()[:16])
        assert oid.may_be_named(name)
        assert not oid.may_be_named("nightly2")


POOLS = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789", max_size=15),
)


@settings(database=None, max_examples=150)
@given(name=st.text(max_size=64), pool=POOLS)
def test_round_trip_property(name: str, pool: str) -> None:
    oid = ids.new("s", pool, name)
    assert ids.parse(str(oid), "s") == oid
    assert ids.parse(str(oid), "v") is None
    assert oid.may_be_named(name)


def test_legacy_ids_are_the_first_128_bits_of_sha256() -> None:
    # The IDs pools made before IDs were unique: they must keep parsing.
    assert str(ids.legacy("v", "loop", "pvc-1")) == "v-loop-" + hashlib.sha256(b"pvc-1").hexdigest()[:32]


def test_digest_is_the_first_128_bits_of_sha256() -> None:
    name = "é" * 64  # 128 bytes of UTF-8, the longest name CSI allows
    assert len(name.encode()) == 128
    assert ids.digest(name) == hashlib.sha256(name.encode()).hexdigest()[:32]
    other = "€" * 42 + "é"  # 128 bytes too, different text
    assert len(other.encode()) == 128
    assert ids.digest(other) != ids.digest(name)


def test_digest_is_deterministic_and_name_sensitive() -> None:
    assert ids.digest("a") == ids.digest("a")
    assert ids.digest("a") != ids.digest("A")
    # NFC and NFD spellings are different names, so different IDs.
    assert ids.digest("\u00e9") != ids.digest("e\u0301")


@pytest.mark.parametrize("pool", ["", "Loop", "1loop", "lo-op", "a" * 17, "lo op", "../x"])
def test_new_refuses_bad_pools(pool: str) -> None:
    with pytest.raises(ValueError, match="invalid pool"):
        ids.new("v", pool, "x")
    with pytest.raises(ValueError, match="invalid pool"):
        ids.legacy("v", pool, "x")


@pytest.mark.parametrize(
    "value",
    [
        f"s-loop-{HEX}",  # wrong kind
        f"g-loop-{HEX}",
        f"v-Loop-{HEX}",  # upper-case pool
        f"v-1oop-{HEX}",  # pool must start with a letter
        f"v-{'a' * 17}-{HEX}",  # pool too long
        f"v--{HEX}",  # empty pool
        f"v-loop-{HEX.upper()}",  # upper-case hex
        f"V-loop-{HEX}",
        f"v-loop-{HEX[:-1]}",  # 31 hex digits
        f"v-loop-{HEX}0",  # 33
        f"v-loop-{HEX[:-1]}g",  # not hex
        f"v-loop-{HEX}\n",  # trailing newline ($ would accept it, \Z must not)
        f" v-loop-{HEX}",
        f"v-loop-../{HEX[3:]}",
        f"../v-loop-{HEX}",
        f"v-loop-{HEX}/../../etc",
        "../../../etc/passwd",
        f"v_loop_{HEX}",
        "",
    ],
)
def test_parse_refuses(value: str) -> None:
    assert ids.parse(value, "v") is None


def test_parse_returns_the_parts() -> None:
    oid = ids.parse(f"g-vg0-{HEX}", "g")
    assert oid == ids.ObjectId("g", "vg0", HEX)
