"""Container engines: real Docker and Podman (and rootless Podman) with ELV's
volume plugin and ``elv attach``. Root; each engine with private state."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.engines import DOCKER, DOCKERD, PODMAN
from tests.support.fixtures import _require_root
from tests.support.markers import mark_folder

__all__ = ["_require_root"]


@pytest.fixture(scope="session", autouse=True)
def _require_engines() -> None:
    # Not a skip: a missing engine must fail the run, never pass as green.
    missing = [p for p in (DOCKERD, DOCKER, PODMAN, "/usr/bin/newuidmap", "/bin/busybox") if not os.access(p, os.X_OK)]
    if missing or shutil.which("useradd") is None:
        pytest.fail(
            f"the engine tests need {', '.join(missing) or 'useradd'}: run scripts/setup-engines "
            "(docker.io, podman, uidmap) and scripts/setup (busybox-static)",
            pytrace=False,
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_folder(items, Path(__file__).parent, pytest.mark.root)
