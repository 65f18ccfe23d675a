"""A long-lived helper process that answers requests one at a time.

Some tools cost more to start than to answer: under emulation an ``lvm``
process spends most of its life loading itself, so ELV asks a resident
``lvm shell`` instead (csi.backend.lvm.shell). The runner's rules still hold:
argv only, the runner's fixed environment, its own process group. Answers
come back on a separate *report* pipe (the tool is told its number through an
environment variable), so the tool's ordinary output can go to /dev/null.

What a session may be killed in the middle of is its user's call: a shell
for reports is killed whenever a question is cancelled or times out; one that
makes changes is journaled by the runner and killed only where a command
would be (a timeout, or shutdown's grace run out). Its stdin is a pipe from
this process, so if the driver dies the helper finishes what it is doing,
reads end-of-file and exits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

#: How much of the helper's stderr to keep for error messages.
STDERR_TAIL = 50


class SessionClosed(Exception):
    """The helper went away (end of its report pipe, or a broken stdin)."""


class Session:
    def __init__(
        self, proc: asyncio.subprocess.Process, report: asyncio.StreamReader, transport: asyncio.BaseTransport
    ) -> None:
        self._proc = proc
        self._report = report
        self._transport = transport
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        # Drain stderr all the time: a helper blocked on a full stderr pipe
        # would never write its answer.
        self._drain = asyncio.ensure_future(self._drain_stderr())

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.returncode is None

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    async def send(self, line: bytes) -> None:
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing():
            raise SessionClosed("the helper's stdin is closed")
        try:
            stdin.write(line)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise SessionClosed(f"the helper's stdin is closed: {e}") from e

    async def read(self) -> bytes:
        """Some bytes of the report pipe; raises SessionClosed at its end."""
        data = await self._report.read(65536)
        if not data:
            raise SessionClosed("the helper closed its report pipe")
        return data

    async def close(self) -> None:
        """Kill the helper and reap it (it only ever answers questions)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), timeout=5.0)
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._transport.close()

    async def _drain_stderr(self) -> None:
        stream = self._proc.stderr
        if stream is None:
            return
        while line := await stream.readline():
            self._stderr.append(line.decode("utf-8", "replace").rstrip())


async def start_session(argv: Sequence[str], env: Mapping[str, str], report_env: str) -> Session:
    """Start ``argv`` with a report pipe whose descriptor number the helper
    finds in the environment variable ``report_env``."""
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**env, report_env: str(write_fd)},
            pass_fds=(write_fd,),
            cwd="/",  # it outlives any one call: never pin the driver's working directory
            process_group=0,
            close_fds=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        # The helper holds the write end now: once it exits, reads see EOF.
        os.close(write_fd)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0)
        )
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    log.debug("session started: pid %d, %s", proc.pid, " ".join(argv))
    return Session(proc, reader, transport)
