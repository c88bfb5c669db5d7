"""Shared fixtures; the helpers they use are in ``helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CP_ANEMIC, make_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", {"anemic": 10, "non-anemic": 14})


@pytest.fixture
def cp_anemic() -> Path:
    if not CP_ANEMIC.is_dir():
        pytest.skip(f"real data not present at {CP_ANEMIC}")
    return CP_ANEMIC
