"""Fixtures of the layers that run a real driver as root (integration,
reliability, conformance, lvm). A conftest imports the ones its folder uses."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from csi.host import scratch as scratch_dirs
from tests.support import observe
from tests.support.driver import Driver, scratch, stop_cleanly


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    # Not a skip: a skipped root layer must never pass as green.
    if os.geteuid() != 0:
        pytest.fail("the integration tests need root (loop devices and mounts); run them as root", pytrace=False)


@pytest.fixture(autouse=True)
def _nothing_left(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """After every test: no mount, no loop device and no process left in any
    scratch directory the test made, read from /proc and /sys directly
    (tests/support/observe.py).

    A scratch directory's removal cleans up by force (so that one failure
    does not break the runs after it), which would hide exactly what this
    looks for: each one is therefore checked just before its removal too.
    Directories made before the test began (a module's or session's driver,
    which holds mounts on purpose) are not this test's: the fixture that
    made them checks them when it ends."""
    made: list[str] = []
    found: list[str] = []
    make, remove = scratch_dirs.make, scratch_dirs.remove

    def making(kind: str, root: str = scratch_dirs.ROOT) -> str:
        path = make(kind, root)
        made.append(path)
        return path

    def removing(base: str) -> bool:
        if base in made:
            found.extend(observe.leftovers(base) + observe.processes_using(base))
        return remove(base)

    monkeypatch.setattr(scratch_dirs, "make", making)
    monkeypatch.setattr(scratch_dirs, "remove", removing)
    yield
    for base in made:
        if os.path.lexists(base):
            found.extend(observe.leftovers(base) + observe.processes_using(base))
    if found:
        pytest.fail(f"the test left behind: {sorted(set(found))}", pytrace=False)


@pytest.fixture
def base() -> Iterator[str]:
    with scratch() as b:
        yield b


@pytest.fixture
def driver(base: str) -> Iterator[Driver]:
    d = Driver(base).start()
    try:
        yield d
    finally:
        stop_cleanly(d, base)
