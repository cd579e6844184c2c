"""Fixtures every area uses: the session data home."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_ft import paths


@pytest.fixture(scope="session")
def data_home() -> Path:
    """The isolated SAGE_FT_HOME of this test session (set in conftest before imports)."""
    return paths.home()
