"""Shared fixtures for every test tier.

Integration and e2e tests talk to a real Apache Kafka broker and the real ClickHouse engine (chDB):

* ``kafka_bootstrap`` (session): ``$KAFKA_BOOTSTRAP`` if set, else the project's broker started once for the
  run by ``deploy/kafka/kafka.sh`` on a test port with its own state directory, stopped at the end;
* ``settings``: frozen :class:`Settings` whose topics are unique to the test (created before, deleted after)
  and whose embedded ClickHouse lives in the test's own directory (closed after: one chDB directory per
  process at a time);
* ``data_dir``: the real Binance recordings in ``../shared/data/binance``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.shared import clickhouse
from services.shared.kafka import delete_topics, ensure_topics
from services.shared.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"
TEST_KAFKA_PORT = int(os.environ.get("KLINES_TEST_KAFKA_PORT", "29092"))
TEST_STATE_DIR = REPO / ".state" / "test"
#: The tiers; CI runs ``-m "unit or integration or e2e"`` and then ``-m "long or chaos"``.
TIERS = frozenset({"unit", "integration", "e2e", "long", "chaos"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test carries a tier marker: a test without one would be selected by no CI run, silently."""
    untiered = [item.nodeid for item in items if not TIERS & {mark.name for mark in item.iter_markers()}]
    if untiered:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(sorted(TIERS))}): {untiered[:5]}")


def binance_data_dir() -> Path:
    """``../shared/data/binance`` beside the checkout (CI lays ``shared/`` beside its clone too)."""
    for base in (REPO.parent / "shared", REPO.parent.parent / "shared", Path("/work/shared")):
        candidate = base / "data" / "binance"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no shared/data/binance beside {REPO}: the real recordings are required")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return binance_data_dir()


def _broker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        KAFKA_PORT=str(TEST_KAFKA_PORT),
        KLINES_STATE_DIR=str(TEST_STATE_DIR),
        KAFKA_LIBS_DIR=str(REPO / ".state" / "kafka-libs"),
    )
    return env


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    existing = os.environ.get("KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    subprocess.run([str(KAFKA_SH), "start"], check=True, env=_broker_env())
    try:
        yield f"127.0.0.1:{TEST_KAFKA_PORT}"
    finally:
        subprocess.run([str(KAFKA_SH), "stop"], check=False, env=_broker_env())


def unique_name(request: pytest.FixtureRequest) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"{base}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings(request: pytest.FixtureRequest, kafka_bootstrap: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings with this test's own topics (created) and its own embedded ClickHouse directory."""
    name = unique_name(request)
    topics = {
        "trades": f"{name}.trades",
        "finalized": f"{name}.klines.finalized",
        "snapshots": f"{name}.klines.snapshots",
        "dead_letter": f"{name}.dead-letter",
    }
    s = load_settings(
        REPO / "config" / "klines.toml",
        kafka={
            "bootstrap": kafka_bootstrap,
            "topics": topics,
            "trades_partitions": 3,
            "klines_partitions": 3,
        },
        clickhouse={"dsn": f"chdb://{tmp_path / 'chdb'}"},
        service={"state_dir": str(tmp_path / "state"), "log_format": "text"},
    )
    asyncio.run(ensure_topics(s.kafka))
    try:
        yield s
    finally:
        clickhouse.close(s.clickhouse)
        asyncio.run(delete_topics(s.kafka, list(topics.values())))
