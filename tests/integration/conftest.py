"""Integration tests: root, real loop devices, real mounts, a real driver process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.harness import Driver, leftovers, scratch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.root)


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    # Not a skip: a skipped integration layer must never pass as green.
    if os.geteuid() != 0:
        pytest.fail("the integration tests need root (loop devices and mounts); run them as root", pytrace=False)


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
        rc = d.stop()
        left = leftovers(base)
        assert rc == 0, f"driver exited with {rc}:\n{d.log()[-3000:]}"
        assert "Traceback" not in d.log(), d.log()[-5000:]
        # Each test must undo what it did through CSI; the scratch fixture only
        # cleans up by force after a failure.
        assert not left, f"test left behind: {left}"
