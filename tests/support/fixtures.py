"""Fixtures of the layers that run a real driver as root (integration,
reliability, lvm). A conftest imports the ones its folder uses."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.driver import Driver, scratch, stop_cleanly


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    # Not a skip: a skipped root layer must never pass as green.
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
        stop_cleanly(d, base)
