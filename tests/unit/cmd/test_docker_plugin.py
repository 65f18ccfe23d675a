"""elv docker-plugin without a driver: options, the HTTP wire, reference
files, the plugin's name and Podman's entry (no root)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from csi.cli import parser
from csi.cmd.common import CliError
from csi.cmd.dockerplugin import main as plugin_main
from csi.cmd.dockerplugin import wire
from csi.cmd.dockerplugin.options import OptionError, Plan, plan, volume_name
from csi.cmd.dockerplugin.state import VolumeDir, volume_ids

MiB = 1024 * 1024

# -- options ---------------------------------------------------------------------------------------


def test_options_make_a_plan() -> None:
    assert plan(None) == plan({}) == Plan()
    assert plan({}).empty
    assert plan({"size": "1G", "fs": "xfs", "provisioning": "thick", "from": "snap-1"}) == Plan(
        size=1000**3, fs="xfs", thick=True, source="snap-1"
    )
    assert plan({"size": "512Mi"}).size == 512 * MiB
    assert plan({"size": "1048576"}).size == MiB
    assert plan({"provisioning": "thin"}) == Plan()


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"sise": "1G"}, "unknown option 'sise'; the elv volume driver takes: size (e.g. 1G, 512Mi or a number"),
        ({"o": "uid=1000", "type": "tmpfs"}, "unknown option 'o'"),
        ({"size": "big"}, "size='big': not a size"),
        ({"size": "0"}, "size='0': must be more than 0"),
        ({"size": "2P"}, "at most 1 PiB"),
        ({"size": "-1G"}, "not a size"),
        ({"fs": "btrfs"}, "fs='btrfs': use ext4 or xfs"),
        ({"fs": ""}, "fs='': use ext4 or xfs"),
        ({"provisioning": "Thick"}, "provisioning='Thick': use thin or thick"),
        ({"from": ""}, "from='': name a snapshot or a volume"),
        ({"from": "x" * 129}, "name a snapshot or a volume"),
        ({"from": "a\nb"}, "name a snapshot or a volume"),
    ],
)
def test_bad_options_say_what_is_wrong(opts: dict[str, str], message: str) -> None:
    with pytest.raises(OptionError) as ei:
        plan(opts)
    assert message in str(ei.value), str(ei.value)


def test_unknown_options_list_every_allowed_one() -> None:
    with pytest.raises(OptionError) as ei:
        plan({"colour": "blue"})
    for key in ("size (", "fs (ext4 or xfs)", "provisioning (thin or thick)", "from ("):
        assert key in str(ei.value)


@pytest.mark.parametrize("opts", [["size=1G"], {"size": 1}, "size=1G"])
def test_options_must_be_a_map_of_strings(opts: Any) -> None:
    with pytest.raises(OptionError, match="map of strings"):
        plan(opts)


@pytest.mark.parametrize("name", ["v1", "pgdata", "a", "My_vol.2-x", "9" * 128])
def test_volume_names_docker_accepts(name: str) -> None:
    assert volume_name(name) == name


@pytest.mark.parametrize("name", ["", "-v", ".v", "a/b", "../x", "a b", "é", "x" * 129, None, 7])
def test_volume_names_refused(name: object) -> None:
    with pytest.raises(OptionError, match="invalid volume name"):
        volume_name(name)


# -- reference files ---------------------------------------------------------------------------------


def test_references_are_hashed_files_and_counted(tmp_path: Path) -> None:
    vd = VolumeDir(str(tmp_path), "v-loop-0123456789abcdef0123456789abcdef")
    vd.prepare()
    assert vd.refs() == set()
    vd.add_ref("a" * 64)
    vd.add_ref("../../etc/passwd")  # an engine's ID never becomes a path
    vd.add_ref("a" * 64)  # a repeat is one reference
    refs = vd.refs()
    assert len(refs) == 2 and all(len(r) == 32 and r.isalnum() for r in refs)
    assert sorted(os.listdir(tmp_path / vd.volume_id / "refs")) == sorted(refs)
    assert vd.holds("../../etc/passwd") and not vd.holds("other")
    assert vd.drop_ref("a" * 64) and not vd.drop_ref("a" * 64)
    assert vd.clear_refs() == 1 and vd.refs() == set()
    vd.remove()
    assert not (tmp_path / vd.volume_id).exists()


def test_volume_dirs_are_only_made_from_ids(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unexpected volume ID"):
        VolumeDir(str(tmp_path), "../escape")
    (tmp_path / "v-loop-1").mkdir()
    (tmp_path / ".hidden").mkdir()
    assert volume_ids(str(tmp_path)) == ["v-loop-1"]
    assert volume_ids(str(tmp_path / "missing")) == []


# -- the wire ---------------------------------------------------------------------------------------


def test_parse_head_and_body() -> None:
    method, path, headers = wire.parse_head(
        b"POST /VolumeDriver.Create HTTP/1.1\r\nHost: plugin\r\nContent-Length: 2\r\nAccept: x"
    )
    assert (method, path, headers["content-length"], headers["host"]) == ("POST", "/VolumeDriver.Create", "2", "plugin")
    assert wire.parse_body(b"") == {} and wire.parse_body(b'{"Name": "v"}') == {"Name": "v"}
    for bad in (b"[1]", b"{", b'"x"'):
        with pytest.raises(wire.BadRequest):
            wire.parse_body(bad)
    with pytest.raises(wire.BadRequest):
        wire.parse_head(b"garbage")


async def _server(tmp_path: Path) -> tuple[str, asyncio.Server, list[tuple[str, dict[str, Any]]]]:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def handler(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        seen.append((path, body))
        if path == "/fail":
            return 500, {"Err": "no such volume: v"}
        return 200, {"Echo": body}

    sock = str(tmp_path / "p.sock")
    return sock, await wire.serve(sock, handler), seen


async def _exchange(sock: str, raw: bytes, responses: int = 1) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(raw)
    await writer.drain()
    out = []
    for _ in range(responses):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        lines = head.split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = json.loads(await reader.readexactly(int(headers["content-length"])))
        out.append((int(lines[0].split()[1]), headers, body))
    writer.close()
    return out


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def test_the_server_answers_json_with_the_plugin_content_type_and_keeps_alive(tmp_path: Path) -> None:
    sock, server, seen = await _server(tmp_path)
    try:
        got = await _exchange(
            sock, _post("/VolumeDriver.Get", b'{"Name":"a"}') + _post("/fail", b'{"Name":"b"}'), responses=2
        )
        assert got[0][0] == 200 and got[0][2] == {"Echo": {"Name": "a"}}
        assert got[0][1]["content-type"] == "application/vnd.docker.plugins.v1.1+json"
        assert got[1][0] == 500 and got[1][2] == {"Err": "no such volume: v"}
        assert seen == [("/VolumeDriver.Get", {"Name": "a"}), ("/fail", {"Name": "b"})]
        chunked = b'POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n4\r\n"b"}\r\n0\r\n\r\n'
        assert (await _exchange(sock, chunked))[0][2] == {"Echo": {"a": "b"}}
    finally:
        server.close()


async def test_the_server_refuses_what_is_not_the_protocol(tmp_path: Path) -> None:
    sock, server, seen = await _server(tmp_path)
    try:
        ((status, _, body),) = await _exchange(sock, _post("/x", b"{not json"))
        assert status == 400 and body["Err"].startswith("the request body is not JSON")
        ((status, _, body),) = await _exchange(sock, b"GET /x HTTP/1.1\r\n\r\n")
        assert status == 405 and "uses POST" in body["Err"]
        big = f"POST /x HTTP/1.1\r\nContent-Length: {wire.MAX_BODY + 1}\r\n\r\n".encode()
        ((status, _, body),) = await _exchange(sock, big)
        assert status == 413
        ((status, _, body),) = await _exchange(sock, b"POST /x HTTP/1.1\r\n" + b"X: y\r\n" * 4000 + b"\r\n")
        assert status == 413
        assert seen == []
    finally:
        server.close()


# -- the command line ----------------------------------------------------------------------------------


def test_plugin_name_comes_from_the_socket() -> None:
    assert plugin_main.plugin_name("/run/docker/plugins/elv.sock") == "elv"
    assert plugin_main.plugin_name("/tmp/x/elvtest-12-1.sock") == "elvtest-12-1"
    for bad in ("elv.sock", "/run/docker/plugins/elv", "/run/docker/plugins/.sock", "/x/a b.sock", "/x/-a.sock"):
        with pytest.raises(CliError):
            plugin_main.plugin_name(bad)


def test_podman_entry_is_printed_and_written_only_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parser().parse_args(["docker-plugin", "--podman-conf"])
    assert plugin_main.run(args) == 0
    printed = capsys.readouterr().out
    assert '[engine.volume_plugins]\nelv = "/run/docker/plugins/elv.sock"\n' in printed
    target = tmp_path / "conf.d" / "50-elv.conf"
    args = parser().parse_args(
        ["docker-plugin", "--podman-conf", "--socket", "/run/docker/plugins/dev.sock", "--write", str(target)]
    )
    assert plugin_main.run(args) == 0
    assert target.read_text().endswith('[engine.volume_plugins]\ndev = "/run/docker/plugins/dev.sock"\n')
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in target.parent.iterdir()] == ["50-elv.conf"], "no temporary file left"
    with pytest.raises(CliError, match="--write goes with --podman-conf"):
        plugin_main.run(parser().parse_args(["docker-plugin", "--write", str(target)]))
    assert parser().parse_args(["docker-plugin", "--podman-conf", "--write"]).write == plugin_main.PODMAN_CONF
