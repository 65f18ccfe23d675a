"""Integration tests: root, real loop devices, real mounts, a real driver process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fixtures import _nothing_left, _require_root, base, driver
from tests.support.markers import mark_folder

__all__ = ["_nothing_left", "_require_root", "base", "driver"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_folder(items, Path(__file__).parent, pytest.mark.root)
