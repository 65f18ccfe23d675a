"""Unix socket paths a server listens on: the driver's, the volume plugin's."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

from csi.errors import ElvError

log = logging.getLogger(__name__)
MAX_UNIX_PATH = 107


class SocketError(ElvError):
    pass


def prepare_socket(path: str) -> None:
    """Make ``path`` free for a new socket.

    A stale socket from a dead driver is removed; a live one (something
    answers) or anything that is not a socket is refused and left untouched.
    """
    if len(path.encode()) > MAX_UNIX_PATH:
        raise SocketError(f"socket path {path} is longer than {MAX_UNIX_PATH} bytes")
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketError(f"cannot check {path}: {e.strerror}") from e
        os.unlink(path)  # nobody listens: a leftover from a crash
        log.info("removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise SocketError(f"another process is already serving on {path}")
