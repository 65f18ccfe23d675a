"""Reports from one resident ``lvm shell`` instead of a new ``lvm`` per query.

Under emulation a bare ``lvs`` costs about 380 ms, nearly all of it starting
``lvm``; five reports inside one ``lvm shell`` cost 533 ms together
(docs/lvm.md). Every RPC that decides something reads LVM first, so that
start-up was most of what ELV added to a volume's life. lvmdbusd asks LVM the
same way, and the protocol is the one lvm2 keeps for it:

* the shell runs with a command profile (``LVM_COMMAND_PROFILE``) that makes
  its reports JSON and adds a command log, and writes each command's report,
  as one JSON document, to the descriptor in ``LVM_REPORT_FD``;
* the document's log holds the shell's status entry for the command:
  ``log_ret_code`` 1 is success, anything else is the exit status a separate
  ``lvm`` would have had (5: failed), and the command's errors (what a
  separate ``lvm`` prints on stderr), so callers see the same failures.

The profile is ELV's own, not one a distribution may or may not ship (Debian
puts lvmdbusd's in lvm2, others in lvmdbusd's package). LVM looks for
profiles only in its system directory, so the shell gets a private
``LVM_SYSTEM_DIR`` that links every entry of /etc/lvm (lvm.conf,
lvmlocal.conf, the devices file, ...) and adds the profile: it reads the
same configuration as every other ``lvm`` ELV runs.

This shell takes only read-only reports: it may be killed at any moment (a
cancelled RPC, a timeout) without leaving LVM half-changed. Changes go to a
second shell that is never killed half-way (csi.backend.lvm.changes).
Each command in the shell re-reads the devices and metadata as a new process
would, so the answers are as fresh as before. If the shell cannot be used
(no profile, an lvm without a shell, a broken answer), the query runs as its
own ``lvm`` and, after a few failures in a row, the shell is left alone.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

from csi.errors import CommandTimeout
from csi.host.runner import Result, Runner
from csi.host.session import Session, SessionClosed

log = logging.getLogger(__name__)

PROFILE = "elv-report"
#: Reports as JSON; the command log holds the shell's status for each command
#: and the errors a separate lvm would print.
PROFILE_TEXT = """\
# Written by ELV for its resident lvm shell (csi/backend/lvm/shell.py).
report {
\toutput_format = "json"
}
log {
\treport_command_log = 1
\tcommand_log_selection = "log_context=shell || log_type=error"
}
"""
SYSTEM_DIR = "/etc/lvm"
REPORT_ENV = "LVM_REPORT_FD"
#: A fresh shell after this many commands: nothing it caches or leaks lives for ever.
MAX_COMMANDS = 500
#: Failures in a row after which ELV stops trying the shell.
MAX_FAILURES = 3
#: The longest report ELV accepts (a VG with thousands of LVs is a few MB).
MAX_DOCUMENT = 64 << 20

# The shell splits its input line itself: refuse anything its quoting could
# read differently (ELV's own arguments never contain these).
_UNSAFE = re.compile(r"[\"'\\\x00-\x1f\x7f]")


class ProtocolError(Exception):
    """The shell answered something ELV cannot read."""


def shell_line(args: Sequence[str]) -> bytes:
    """One shell input line for ``args`` (the command and its arguments)."""
    words = []
    for a in args:
        if not a or _UNSAFE.search(a):
            raise ValueError(f"argument {a!r} cannot be passed through the lvm shell")
        words.append(f'"{a}"' if any(c.isspace() for c in a) else a)
    return (" ".join(words) + "\n").encode()


class Framer:
    """Cuts the report stream into its JSON documents, whatever the chunking."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buf = ""
        self._json = json.JSONDecoder()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += self._decoder.decode(data)
        if len(self._buf) > MAX_DOCUMENT:
            raise ProtocolError(f"a report longer than {MAX_DOCUMENT} bytes")
        docs: list[Any] = []
        while True:
            text = self._buf.lstrip()
            if not text:
                self._buf = ""
                return docs
            if not text.startswith("{"):
                raise ProtocolError(f"the report stream holds {text[:40]!r}")
            try:
                doc, end = self._json.raw_decode(text)
            except json.JSONDecodeError:
                self._buf = text  # incomplete: wait for more
                return docs
            docs.append(doc)
            self._buf = text[end:]


def _log(doc: Any) -> list[dict[str, Any]]:
    if not isinstance(doc, dict):
        raise ProtocolError("a report that is not a JSON object")
    entries = doc.get("log", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ProtocolError("a report whose log is not a list of objects")
    return entries


def exit_status(doc: Any) -> int:
    """The exit status a separate ``lvm`` would have had for this document's command."""
    for entry in reversed(_log(doc)):
        if entry.get("log_context") == "shell" and entry.get("log_type") == "status":
            try:
                ret = int(entry.get("log_ret_code", ""))
            except ValueError:
                break
            return 0 if ret == 1 else ret
    raise ProtocolError("a report without the shell's status for its command")


def messages(doc: Any) -> str:
    """The errors and warnings of a document's log, as a separate ``lvm`` prints them."""
    lines = [
        f"  {e.get('log_message', '')}"
        for e in _log(doc)
        if e.get("log_type") in ("error", "warn") and e.get("log_message")
    ]
    return "\n".join(lines)


def system_dir(path: str, source: str = SYSTEM_DIR) -> str:
    """Make ``path`` the shell's LVM system directory: a link to every entry
    of ``source`` but its profiles, and a profile directory that links each
    of those and adds ELV's. Rebuilt from scratch each time: /etc/lvm may
    have changed since the last shell started."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    for name in os.listdir(path):
        entry = os.path.join(path, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry)
        else:
            os.unlink(entry)
    for name in _entries(source):
        if name != "profile":
            os.symlink(os.path.join(source, name), os.path.join(path, name))
    profiles = os.path.join(path, "profile")
    os.mkdir(profiles, 0o700)
    for name in _entries(os.path.join(source, "profile")):
        if name != f"{PROFILE}.profile":
            os.symlink(os.path.join(source, "profile", name), os.path.join(profiles, name))
    with open(os.path.join(profiles, f"{PROFILE}.profile"), "w", encoding="utf-8") as f:
        f.write(PROFILE_TEXT)
    return path


def _entries(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


class LvmShell:
    """One resident ``lvm shell`` for one driver; queries take turns in it.

    ``home`` is a private directory for its LVM system directory (one per
    shell: each rebuilds it when it starts)."""

    #: Whether the runner journals the shell like a running change.
    journaled = False
    #: What the logs call it.
    what = "lvm shell for reports"

    def __init__(self, runner: Runner, home: str, argv: Sequence[str] = ("lvm",)) -> None:
        self._runner = runner
        self._home = home
        self._argv = tuple(argv)
        self._lock = asyncio.Lock()
        self._session: Session | None = None
        self._framer = Framer()
        self._docs: list[Any] = []
        self._commands = 0
        self._failures = 0
        self.disabled = False

    @property
    def pid(self) -> int | None:
        return self._session.pid if self._session is not None and self._session.alive else None

    async def query(self, args: Sequence[str], timeout: float) -> Result | None:
        """The result of ``lvm ARGS`` answered by the shell, or None when the
        shell cannot answer it (the caller then runs ``lvm`` itself)."""
        if self.disabled:
            return None
        try:
            line = shell_line(args)
        except ValueError:
            return None
        return await self._locked(("lvm", *args), line, timeout)

    async def _locked(self, argv: tuple[str, ...], line: bytes, timeout: float) -> Result | None:
        async with self._lock:
            return await self._ask(argv, line, timeout)

    async def _ask(self, argv: tuple[str, ...], line: bytes, timeout: float) -> Result | None:
        start = time.monotonic()
        log.debug("shell %s", " ".join(argv))
        sent: list[bool] = []
        try:
            doc = await asyncio.wait_for(self._exchange(line, sent), timeout)
            status, stderr = exit_status(doc), messages(doc)
        except TimeoutError:
            await self._end()
            self._runner.observe("lvm", time.monotonic() - start, None)
            log.warning("%s: no answer after %.1fs: %s", self.what, timeout, " ".join(argv))
            raise CommandTimeout(argv, timeout) from None
        except asyncio.CancelledError:
            # The shell is still working on the question: a fresh one is
            # cheaper than reading an answer nobody wants.
            await asyncio.shield(self._end())
            raise
        except (SessionClosed, ProtocolError, OSError) as e:
            await self._failed(e)
            if sent:
                self._unanswered(argv, e)
            return None
        self._failures = 0
        seconds = time.monotonic() - start
        self._runner.observe("lvm", seconds, status)
        return Result(argv, status, json.dumps(doc).encode(), stderr.encode(), seconds)

    def _unanswered(self, argv: tuple[str, ...], e: Exception) -> None:
        """The command was sent but its answer was lost. A report is simply
        asked again of a separate lvm."""

    async def _exchange(self, line: bytes, sent: list[bool]) -> Any:
        s = await self._current()
        self._commands += 1
        await s.send(line)
        sent.append(True)
        while not self._docs:
            self._docs.extend(self._framer.feed(await s.read()))
        return self._docs.pop(0)

    async def _current(self) -> Session:
        if self._session is not None and (not self._session.alive or self._commands >= MAX_COMMANDS):
            await self._end()
        if self._session is None:
            env = {"LVM_SYSTEM_DIR": system_dir(self._home), "LVM_COMMAND_PROFILE": PROFILE}
            self._session = await self._runner.session(
                self._argv, report_env=REPORT_ENV, extra_env=env, journaled=self.journaled
            )
        return self._session

    async def _end(self) -> None:
        s, self._session = self._session, None
        self._framer, self._docs, self._commands = Framer(), [], 0
        if s is not None:
            await self._runner.end_session(s)

    async def _failed(self, e: Exception) -> None:
        tail = self._session.stderr_tail() if self._session is not None else ""
        await self._end()
        self._failures += 1
        if self._failures >= MAX_FAILURES:
            self.disabled = True
            log.error("%s: unusable (%s; %s); each now runs its own lvm", self.what, e, tail or "no stderr")
        else:
            log.warning("%s: %s (%s)", self.what, e, tail or "no stderr")
