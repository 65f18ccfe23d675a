"""The one way ELV runs an external command.

Rules, each learnt from other drivers' incidents:

* argv lists only, never a shell (CVE-2023-3676 and friends pasted PV fields
  into command strings);
* a fixed, minimal environment with ``LC_ALL=C`` so output parsers see the
  same text everywhere, and nothing of the caller's environment leaks in;
* every command has a timeout; a command that passes it is killed (its whole
  process group) and reported as :class:`CommandTimeout`;
* a *mutating* command is never killed because the RPC that started it was
  cancelled: CSI callers retry with the same arguments, and a half-done
  ``mkfs`` or ``lvcreate`` is worse than a finished one. Read-only queries may
  be killed on cancel (TopoLVM #1163: orphaned ``lvs`` piled up);
* a bounded number of commands run at once, so a request flood cannot fork
  the node to death.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from csi.errors import CommandError, CommandTimeout
from csi.host import procs
from csi.host.session import Session, start_session

log = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Called after every command: (program name, seconds, exit status or None on timeout).
Observer = Callable[[str, float, "int | None"], None]


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


class Runner:
    """Runs commands for the driver. One instance is shared by the process."""

    def __init__(
        self,
        *,
        default_timeout: float = 120.0,
        max_parallel: int = 16,
        extra_env: Mapping[str, str] | None = None,
        observer: Observer | None = None,
        search_path: str = SAFE_PATH,
        journal_dir: str | None = None,
    ) -> None:
        self.default_timeout = default_timeout
        self._journal = journal_dir
        self._slots = asyncio.Semaphore(max_parallel)
        env = {"PATH": search_path, "LC_ALL": "C", "LANG": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}
        env.update(extra_env or {})
        self._env = env
        self._observer = observer
        # Every command still running, so shutdown can wait for (or reap) each
        # one before the event loop that owns its pipes goes away.
        self._live: set[asyncio.Future[Any]] = set()
        self._sessions: set[Session] = set()
        self._session_records: dict[Session, str] = {}

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        ok_codes: Collection[int] = (0,),
        mutating: bool = True,
        stdin: bytes | None = None,
    ) -> Result:
        """Run ``argv`` and return its result.

        Raises :class:`CommandError` when the exit status is not in
        ``ok_codes`` and :class:`CommandTimeout` when it runs too long.
        """
        args = _check_argv(argv)
        limit = self.default_timeout if timeout is None else timeout
        work = asyncio.ensure_future(self._slotted(args, limit, stdin, mutating))
        self.track(work)
        if mutating:
            # Let the command finish even if our caller goes away.
            result = await asyncio.shield(work)
        else:
            result = await work
        if result.returncode not in ok_codes:
            raise CommandError(args, result.returncode, result.stdout, result.stderr)
        return result

    async def _slotted(self, args: tuple[str, ...], limit: float, stdin: bytes | None, mutating: bool) -> Result:
        # The slot is held by the task, so a shielded command keeps it until it ends.
        async with self._slots:
            return await self._execute(args, limit, stdin, mutating)

    async def _execute(self, args: tuple[str, ...], limit: float, stdin: bytes | None, mutating: bool) -> Result:
        start = time.monotonic()
        log.debug("exec %s", " ".join(args))
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
            process_group=0,  # own process group, so a kill reaches helpers too (and vfork stays usable)
            close_fds=True,
        )
        entry = self._record(proc.pid, args) if mutating else None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=limit)
        except TimeoutError:
            _kill_group(proc.pid)
            # A process stuck in the kernel (D state) may never die; don't wait forever.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=2.0)
            self._observe(args[0], time.monotonic() - start, None)
            log.warning("command timed out after %.1fs: %s", limit, " ".join(args))
            raise CommandTimeout(args, limit) from None
        except asyncio.CancelledError:
            # Read-only commands get here, and at shutdown whatever outlived
            # close()'s grace. Reap the child now: a transport left to the
            # garbage collector fires on a closed loop.
            _kill_group(proc.pid)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(proc.wait(), timeout=2.0)
            raise
        finally:
            if entry is not None and proc.returncode is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry)
        seconds = time.monotonic() - start
        rc = proc.returncode if proc.returncode is not None else -1
        self._observe(args[0], seconds, rc)
        return Result(args, rc, out, err, seconds)

    async def session(
        self,
        argv: Sequence[str],
        *,
        report_env: str,
        extra_env: Mapping[str, str] | None = None,
        journaled: bool = False,
    ) -> Session:
        """Start a long-lived helper (see csi.host.session), in this runner's
        environment plus ``extra_env``. A ``journaled`` helper may be making
        changes: it is recorded like a running mutating command, so that a
        successor of this process waits for it to finish its last one."""
        args = _check_argv(argv)
        s = await start_session(args, {**self._env, **(extra_env or {})}, report_env)
        self._sessions.add(s)
        if journaled and (entry := self._record(s.pid, args)) is not None:
            self._session_records[s] = entry
        return s

    async def end_session(self, s: Session) -> None:
        self._sessions.discard(s)
        await s.close()
        entry = self._session_records.pop(s, None)
        if entry is not None and not s.alive:
            _unlink(entry)

    def track(self, work: asyncio.Future[Any]) -> None:
        """Count work as running: close() waits for it. Every command of
        run() is counted here, and so is work done outside one (a change a
        session makes)."""
        self._live.add(work)
        work.add_done_callback(self._live.discard)

    def observe(self, program: str, seconds: float, rc: int | None) -> None:
        """Count a command a session answered, as if it had run on its own."""
        self._observe(program, seconds, rc)

    @property
    def running(self) -> int:
        return len(self._live)

    async def close(self, grace: float) -> int:
        """At shutdown: let running commands finish for up to ``grace``
        seconds (a half-done mkfs is worse than a finished one), then kill and
        reap the rest. Returns how many had to be killed. Sessions end after
        that: one may be making a change the wait was for."""
        pending: set[asyncio.Future[Any]] = set()
        if self._live:
            _, pending = await asyncio.wait(set(self._live), timeout=grace)
        for task in pending:
            log.warning("shutdown: killing a command still running after %.0fs", grace)
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        for s in list(self._sessions):
            await self.end_session(s)
        return len(pending)

    # -- commands left running by a previous incarnation ----------------------

    def _record(self, pid: int, args: tuple[str, ...]) -> str | None:
        """Note a running mutating command, so that if this process dies, the
        next one waits for it instead of racing it (an orphaned mkfs keeps
        writing after its parent is killed)."""
        if self._journal is None:
            return None
        path = os.path.join(self._journal, f"{pid}.json")
        try:
            with open(path, "w", encoding="utf-8") as f:
                # The process by pid and start time: that names it across its
                # exec (a tool run through a wrapper script changes its command
                # line) and never names another process that reuses the pid.
                json.dump({"argv": list(args), "process": procs.token(pid)}, f)
        except OSError:
            log.warning("cannot record running command in %s", self._journal, exc_info=True)
            return None
        return path

    async def wait_for_orphans(self, timeout: float) -> int:
        """Wait for commands a previous incarnation left running; kill those
        still running after ``timeout``. Returns how many were found alive
        (waited for, and possibly killed)."""
        if self._journal is None:
            return 0
        os.makedirs(self._journal, mode=0o700, exist_ok=True)
        alive: dict[_Orphan, str] = {}
        for name in os.listdir(self._journal):
            path = os.path.join(self._journal, name)
            try:
                with open(path, encoding="utf-8") as f:
                    orphan = _Orphan.of(int(name.removesuffix(".json")), json.load(f))
            except (ValueError, OSError):
                orphan = None
            if orphan is not None and orphan.runs():
                alive[orphan] = path
                log.warning("waiting for pid %d, left running by a previous instance", orphan.pid)
            else:
                _unlink(path)
        found = len(alive)
        deadline = time.monotonic() + timeout
        while alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            for orphan, path in list(alive.items()):
                if not orphan.runs():
                    _unlink(path)
                    del alive[orphan]
        for orphan, path in alive.items():
            log.error("killing pid %d, still running after %.0fs", orphan.pid, timeout)
            _kill_group(orphan.pid)
            _unlink(path)
        return found

    def _observe(self, program: str, seconds: float, rc: int | None) -> None:
        if self._observer is not None:
            try:
                self._observer(os.path.basename(program), seconds, rc)
            except Exception:  # metrics must never break a command
                log.exception("command observer failed")


def _check_argv(argv: Sequence[str]) -> tuple[str, ...]:
    if isinstance(argv, str | bytes) or not argv:
        raise TypeError("argv must be a non-empty list of strings")
    args = tuple(argv)
    for a in args:
        if not isinstance(a, str):
            raise TypeError(f"argv items must be str, not {type(a).__name__}")
        if "\x00" in a:
            raise ValueError("argv item contains a NUL byte")
    return args


@dataclass(frozen=True)
class _Orphan:
    """A command a journal record names: by pid and start time (``token``), or,
    in a record an older version wrote, by the command line it was to show."""

    pid: int
    token: str | None
    cmdline: str | None

    @classmethod
    def of(cls, pid: int, record: object) -> _Orphan | None:
        if not isinstance(record, dict) or pid <= 0:
            return None
        token, cmdline = record.get("process"), record.get("cmdline")
        if isinstance(token, str) and token.split(" ", 1)[0] == str(pid):
            return cls(pid, token, None)
        if isinstance(cmdline, str) and cmdline:
            return cls(pid, None, cmdline)
        return None

    def runs(self) -> bool:
        if self.token is not None:
            return procs.alive(self.token)
        return _cmdline(self.pid) == self.cmdline


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read()
    except OSError:
        return None
    if not data:
        return None  # a zombie or a kernel thread
    return data.decode("utf-8", "replace")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
