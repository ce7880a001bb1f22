"""Unit-test fixtures: where the real Binance recordings live (``../shared/data/binance`` beside the checkout)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def binance_data() -> Path:
    """Directory of the real Binance recordings (CI lays ``shared/`` beside its clone)."""
    repo = Path(__file__).resolve().parents[2]
    for base in (repo / ".." / "shared", repo / ".." / ".." / "shared", Path("/work/shared")):
        candidate = (base / "data" / "binance").resolve()
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no shared/data/binance beside {repo}: the real recordings are required")
