"""Marking tests by the folder they live in.

A conftest's ``pytest_collection_modifyitems`` receives every test the session
collected, not only its own folder's: a hook that marks all of them marks the
unit tests ``root`` too, and ``-m "not root"`` then runs nothing. Each conftest
therefore marks only what lies under its own directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def mark_folder(items: list[pytest.Item], folder: Path, *marks: pytest.MarkDecorator) -> None:
    """Add ``marks`` to the tests under ``folder`` (a conftest's directory) and to no others."""
    for item in items:
        if item.path.is_relative_to(folder):
            for m in marks:
                item.add_marker(m)
