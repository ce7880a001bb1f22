"""Fixtures of the whole-pipeline tests (see ``harness.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import isolated_env


@pytest.fixture
def state(kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The run's own state, topics and ports, in this process's environment (a pipeline run in-process by
    :func:`harness.run_faulted` reads its settings from it)."""
    state = tmp_path / "state"
    for key, value in isolated_env(kafka_bootstrap, state).items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    yield state
