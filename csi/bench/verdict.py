"""The benchmark's targets and their verdicts: pure logic, no I/O.

Every target is a ratio of two figures measured side by side in the same run
(ELV against the raw tools, against itself at another scale, against a bare
Python process or against the peer driver), because the machine is shared and
its absolute speed changes from run to run. A target ends in one of three
verdicts: ``met``, ``missed``, or ``UNMEASURED`` with the reason (a section
that could not run is reported, never dropped). ``elv bench`` exits non-zero
unless every target is met.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MET = "met"
MISSED = "missed"
UNMEASURED = "UNMEASURED"


@dataclass(frozen=True)
class Goal:
    """One target: ``key``'s ratio must be at most (or at least) ``limit``."""

    key: str
    what: str
    limit: float
    higher_is_better: bool = False
    section: str = ""

    def bound(self) -> str:
        return f"{'>=' if self.higher_is_better else '<='} {self.limit:g}"


@dataclass(frozen=True)
class Figure:
    """What a section measured for one target: the ratio, or why there is none,
    and the absolute figures behind it (bound to this machine)."""

    value: float | None = None
    unmeasured: str = ""
    detail: str = ""


@dataclass(frozen=True)
class Verdict:
    goal: Goal
    status: str
    value: float | None
    reason: str = ""
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.goal.key,
            "what": self.goal.what,
            "bound": self.goal.bound(),
            "status": self.status,
            "value": self.value,
            "reason": self.reason,
            "detail": self.detail,
        }


def judge(goal: Goal, fig: Figure | None) -> Verdict:
    """The verdict on one target. No figure, or a figure without a finite
    value, is UNMEASURED: a target is met only by a number that meets it."""
    if fig is None:
        return Verdict(goal, UNMEASURED, None, f"the {goal.section or 'section'} section did not report it")
    if fig.value is None or not math.isfinite(fig.value):
        reason = fig.unmeasured or "no value was measured"
        return Verdict(goal, UNMEASURED, None, reason, fig.detail)
    v = fig.value
    ok = v >= goal.limit if goal.higher_is_better else v <= goal.limit
    return Verdict(goal, MET if ok else MISSED, v, "", fig.detail)


def judge_all(goals: Iterable[Goal], figures: Mapping[str, Figure]) -> list[Verdict]:
    return [judge(g, figures.get(g.key)) for g in goals]


@dataclass(frozen=True)
class Outcome:
    met: int = 0
    missed: int = 0
    unmeasured: int = 0
    failing: list[str] = field(default_factory=list)

    @property
    def all_met(self) -> bool:
        return self.missed == 0 and self.unmeasured == 0


def outcome(verdicts: Iterable[Verdict]) -> Outcome:
    met = missed = unmeasured = 0
    failing = []
    for v in verdicts:
        if v.status == MET:
            met += 1
        elif v.status == MISSED:
            missed += 1
            failing.append(v.goal.key)
        else:
            unmeasured += 1
            failing.append(v.goal.key)
    return Outcome(met, missed, unmeasured, failing)


def exit_code(verdicts: Iterable[Verdict], *, allow_miss: bool = False) -> int:
    """0 only when every target is met; ``allow_miss`` (exploration) always 0."""
    return 0 if allow_miss or outcome(verdicts).all_met else 1


def line(v: Verdict) -> str:
    value = "-" if v.value is None else f"{v.value:.3f}"
    note = v.reason if v.status == UNMEASURED else ""
    tail = "; ".join(x for x in (note, v.detail) if x)
    return f"{v.status:<10} {v.goal.what:<58} {value:>7}  {v.goal.bound():<8} {tail}".rstrip()


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the
    denominator is not positive (a ratio against nothing measures nothing)."""
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return numerator / denominator
