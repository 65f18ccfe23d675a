from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from csi.config import Config
from csi.host.sockets import MAX_UNIX_PATH, SocketError, prepare_socket
from csi.server.driver import secure_socket


def test_missing_path_is_fine_and_parents_are_created(tmp_path: Path) -> None:
    path = tmp_path / "run" / "elv" / "csi.sock"
    prepare_socket(str(path))
    assert path.parent.is_dir()
    assert not path.exists()


def test_a_regular_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    path.write_text("precious data")
    os.utime(path, (1_000_000_000, 1_000_000_000))
    before = os.stat(path)
    with pytest.raises(SocketError, match="exists and is not a socket"):
        prepare_socket(str(path))
    after = os.stat(path)
    assert path.read_text() == "precious data"
    assert after.st_mtime_ns == before.st_mtime_ns == 1_000_000_000 * 10**9
    assert after.st_ino == before.st_ino


def test_a_directory_or_symlink_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "dir.sock"
    d.mkdir()
    with pytest.raises(SocketError):
        prepare_socket(str(d))
    assert d.is_dir()
    link = tmp_path / "link.sock"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SocketError):
        prepare_socket(str(link))
    assert link.is_symlink()


def test_a_stale_socket_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    s.close()  # the driver died: the file stays, nobody listens
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    prepare_socket(str(path))
    assert not path.exists()


def test_a_live_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        s.listen(1)
        with pytest.raises(SocketError, match="another process is already serving"):
            prepare_socket(str(path))
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_path_longer_than_107_bytes_is_refused(tmp_path: Path) -> None:
    path = "/tmp/" + "x" * (MAX_UNIX_PATH - len("/tmp/") + 1)
    assert len(path.encode()) == 108
    with pytest.raises(SocketError, match="longer than 107 bytes"):
        prepare_socket(path)
    # Bytes count, not characters.
    base = f"{tmp_path}/"
    mb = base + "é" * (MAX_UNIX_PATH - len(base))
    assert len(mb) < 108 < len(mb.encode())
    with pytest.raises(SocketError):
        prepare_socket(mb)
    assert not os.path.exists(mb)


def test_secure_socket_without_group_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        os.chmod(path, 0o777)
        secure_socket(str(path), None)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


@pytest.mark.parametrize("endpoint", ["/run/csi.sock", "tcp://x:1", "unix://run/csi.sock", "unix:/x"])
def test_config_refuses_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError, match="unix:///absolute/path"):
        _ = Config(endpoint=endpoint, node_id="n").socket_path


def test_config_socket_path_and_topology_key() -> None:
    c = Config(endpoint="unix:///run/elv/csi.sock", node_id="node-a")
    assert c.socket_path == "/run/elv/csi.sock"
    assert c.topology_key == "topology.elv.csi.dev/node"
