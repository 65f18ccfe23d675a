"""LVM changes made by a second resident ``lvm shell``.

Under emulation starting ``lvm`` costs 0.5-1 s, and a volume's life runs four
to six changes (lvcreate, the formatted tag, deactivation, the wipe's
quarantine, lvremove), each a guarantee ELV keeps. In a resident shell the
same commands cost 0.1-0.3 s (docs/lvm.md). The reports' shell cannot take
them: it is killed whenever a report is cancelled. This one keeps the rules
that hold for a change run as its own process (csi.host.runner):

* it is never killed because the RPC that asked for the change went away: the
  change runs to its end and the runner's shutdown waits for it (``track``);
  only a timeout, or shutdown's grace run out, kills it, as they would kill
  an ``lvcreate``;
* the runner journals the shell like a running change, so if the driver
  dies, its successor waits for the shell, which finishes its command, reads
  end-of-file and exits;
* a change whose answer is lost (the shell died after it was sent) is never
  run again: LVM may have made it. The RPC fails UNAVAILABLE, and its retry
  reads LVM first, as every RPC does;
* a command that could ask a question on its terminal never goes there: the
  shell's stdin is the command pipe, so a y/n prompt would wait for the next
  command. Only commands with ``--yes``, and lvchange with nothing but tag
  options, are sent; the rest run as their own ``lvm`` (no terminal: the
  answer is no, as before);
* while the shell is busy, a change runs as its own process instead of
  queueing behind it: changes stay as concurrent as they were.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from csi.backend.lvm.shell import LvmShell, shell_line
from csi.errors import Unavailable
from csi.host.runner import Result

log = logging.getLogger(__name__)

#: lvchange options that change tags only: such an lvchange never prompts.
TAG_OPTIONS = frozenset({"--addtag", "--deltag"})
YES = frozenset({"-y", "--yes"})


def never_prompts(args: Sequence[str]) -> bool:
    """Whether ``lvm ARGS`` (command first) cannot stop at a y/n question."""
    if YES.intersection(args):
        return True
    if not args or args[0] != "lvchange":
        return False
    words, tags = iter(args[1:]), 0
    for word in words:
        if word == "--config":
            next(words, None)
        elif word in TAG_OPTIONS:
            next(words, None)
            tags += 1
        elif word.startswith("-"):
            return False
    return tags > 0


class ChangeShell(LvmShell):
    """The resident shell for changes. ``change`` answers None when the
    change must run as its own process (busy, disabled, or a command that
    could prompt)."""

    journaled = True
    what = "lvm shell for changes"

    async def change(self, args: Sequence[str], timeout: float) -> Result | None:
        if self.disabled or self._lock.locked() or not never_prompts(args):
            return None
        try:
            line = shell_line(args)
        except ValueError:
            return None
        work = asyncio.ensure_future(self._locked(("lvm", *args), line, timeout))
        work.add_done_callback(_seen)
        self._runner.track(work)
        # Shielded: a caller that goes away leaves the change running.
        return await asyncio.shield(work)

    def _unanswered(self, argv: tuple[str, ...], e: Exception) -> None:
        raise Unavailable(
            f"the lvm shell went away while it ran {argv[1]} ({e}); LVM may or may not have made the change, "
            "so it is not run again: retry, and the state is read first"
        )


def _seen(work: asyncio.Future[Result | None]) -> None:
    """Read the outcome of a change whose caller may have gone away, so its
    failure is logged once rather than as a task nobody awaited."""
    if work.cancelled():
        return
    e = work.exception()
    if e is not None:
        log.debug("a change in the lvm shell failed: %s", e)
