"""Conformance: csi-sanity against a real driver (root), and the descriptor checks."""

from __future__ import annotations

from tests.support.fixtures import _nothing_left

__all__ = ["_nothing_left"]
