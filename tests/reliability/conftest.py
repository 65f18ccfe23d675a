"""Reliability and security suite: root, real devices, a real driver."""

from tests.integration.conftest import _require_root, base, driver, pytest_collection_modifyitems

__all__ = ["_require_root", "base", "driver", "pytest_collection_modifyitems"]
