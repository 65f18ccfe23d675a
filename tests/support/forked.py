"""Start ``elv serve`` by forking a pre-imported interpreter instead of
exec'ing a new one.

A crash test restarts the driver after every kill. Inside the emulated LVM
guest a fresh Python spends about four seconds importing grpc, protobuf and
the package before the driver does anything, which is most of a kill's cost.
A forked child is still a new process: it has its own pid, a SIGKILL ends it
and everything it held, and it runs the whole of ``elv serve`` from argument
parsing through recovery. Only the imports were done before the fork, in a
server process that never served (multiprocessing's forkserver, which also
never starts gRPC, so no gRPC thread or poller is forked).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess

PRELOAD = ["csi.cli", "csi.server.log", "csi.server.driver", "csi.backend.loop", "csi.backend.lvm"]
_ctx: ForkServerContext | None = None


def _context() -> ForkServerContext:
    global _ctx
    if _ctx is None:
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def _serve(argv: list[str], log_path: str) -> None:
    # The child's stdout and stderr go to the driver's log, as an exec'd driver's do.
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from csi.cli import main

    sys.exit(main(argv))


class ForkedDriver:
    """The part of ``subprocess.Popen``'s interface the harness uses."""

    def __init__(self, argv: Sequence[str], log_path: str) -> None:
        self._p: BaseProcess = _context().Process(target=_serve, args=(list(argv), log_path), daemon=False)
        self._p.start()
        self.args = list(argv)

    @property
    def pid(self) -> int | None:
        return self._p.pid

    @property
    def returncode(self) -> int | None:
        return self._p.exitcode

    def poll(self) -> int | None:
        return self._p.exitcode

    def send_signal(self, sig: int) -> None:
        if self._p.exitcode is None and self._p.pid is not None:
            os.kill(self._p.pid, sig)

    def kill(self) -> None:
        self._p.kill()

    def wait(self, timeout: float | None = None) -> int:
        self._p.join(timeout)
        if self._p.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return self._p.exitcode
