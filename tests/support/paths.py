"""Where the tests find the checkout and their captured data."""

from __future__ import annotations

from pathlib import Path

#: The repository's root (scripts/, csi/, tests/ are below it).
REPO = str(Path(__file__).resolve().parents[2])
#: Captures from real hosts: blkid, losetup, mountinfo, LVM reports, superblocks.
DATA = Path(REPO) / "tests" / "data"
