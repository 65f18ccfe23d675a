"""Telling a live process from a dead one whose pid was reused.

A pid alone names a process only while it lives; once it exits the kernel may
give the pid to another. A pid together with the process's start time (field
22 of /proc/PID/stat, in clock ticks since boot) names one process for good.
"""

from __future__ import annotations

import os


def start_time(pid: int, proc: str = "/proc") -> str | None:
    """When ``pid`` started, or None if there is no such (non-zombie) process."""
    try:
        with open(f"{proc}/{pid}/stat") as f:
            stat = f.read()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return fields[19]


def token(pid: int | None = None) -> str:
    """``"PID START"``: this process (or ``pid``), in a form that outlives pid reuse."""
    pid = os.getpid() if pid is None else pid
    return f"{pid} {start_time(pid)}"


def alive(tok: str) -> bool:
    """Whether the process a :func:`token` named still runs."""
    pid_s, _, start = tok.strip().partition(" ")
    try:
        pid = int(pid_s)
    except ValueError:
        return False
    return pid > 0 and start != "None" and start_time(pid) == start
