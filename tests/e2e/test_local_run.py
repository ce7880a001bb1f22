"""The local run command, as a user starts it, against the replay exchange, checked with ``klines verify``.

One run serves every test here: ``klines run --offline ... --until-exhausted --verify`` on a generated market of
several symbols, accelerated, with the real broker and embedded ClickHouse. The run's own ``verify`` compares
every stored finalized kline with the exchange's REST klines, for every symbol and interval, field by field.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = "BTCUSDT,ETHUSDT,SOLUSDT"
INTERVALS = "1m,3m,5m,15m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def local_run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    state = tmp_path_factory.mktemp("run-state")
    name = uuid.uuid4().hex[:8]
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP=kafka_bootstrap,
        CLICKHOUSE_DSN=f"chdb://{state / 'chdb'}",
        KLINES_SERVICE__STATE_DIR=str(state),
        KLINES_KAFKA__TOPICS__TRADES=f"e2e-{name}.trades",
        KLINES_KAFKA__TOPICS__FINALIZED=f"e2e-{name}.klines.finalized",
        KLINES_KAFKA__TOPICS__SNAPSHOTS=f"e2e-{name}.klines.snapshots",
        KLINES_KAFKA__TOPICS__DEAD_LETTER=f"e2e-{name}.dead-letter",
        KLINES_KAFKA__CLIENT_ID=f"e2e-{name}",
        KLINES_AGGREGATOR__HTTP_PORT=str(free_port()),
        KLINES_SERVICE__INGEST_HTTP_PORT=str(free_port()),
        KLINES_SERVICE__WRITERS_HTTP_PORT=str(free_port()),
        KLINES_GATEWAY__HTTP_PORT=str(free_port()),
    )
    argv = [
        sys.executable, "-m", "services.cli", "run", "--offline",
        "--symbols", SYMBOLS, "--intervals", INTERVALS,
        "--market-duration", "40m", "--speed", "60", "--start", "2026-02-28T23:40:00Z",
        "--replay-port", str(free_port()), "--until-exhausted", "--duration", "240", "--verify",
    ]  # fmt: skip
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=420)


def test_every_stored_kline_equals_the_exchange_klines(local_run: subprocess.CompletedProcess[str]) -> None:
    out = local_run.stdout
    assert local_run.returncode == 0, f"stdout:\n{out}\nstderr:\n{local_run.stderr}"
    match = re.search(r"verify OK: (\d+) klines checked over (\d+) symbol×interval pairs, 0 mismatches, 0 gaps", out)
    assert match, out
    checked, pairs = int(match.group(1)), int(match.group(2))
    assert pairs == len(SYMBOLS.split(",")) * len(INTERVALS.split(","))
    # 40 market minutes: at least 35 closed 1m klines per symbol are compared, plus the longer intervals.
    assert checked >= 3 * (35 + 11 + 6 + 1)


def test_the_run_output_reads_well(local_run: subprocess.CompletedProcess[str]) -> None:
    out = local_run.stdout
    # Progress while it starts: what is up, what it waits for.
    for line in (
        "Kafka broker at",
        "topics:",
        "schema ready",
        "market: local replay exchange",
        "starting writers",
        "starting aggregator",
        "starting ingest",
        "pipeline is up",
        "stopping: the replay is exhausted",
        "stopping ingest",
        "ingest stopped (exit 0)",
        "aggregator stopped (exit 0)",
        "writers stopped (exit 0)",
        "Finalized klines stored in",
        "Query it:",
        "klines sql",
    ):
        assert line in out, f"{line!r} missing from:\n{out}"
    # Every line of progress is stamped and short enough for a terminal; no Python traceback leaks out.
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert progress and all(re.match(r"\[\s*\d+\.\d+s\] \S", line) for line in progress)
    assert all(len(line) <= 200 for line in progress)
    assert "Traceback" not in out and "Traceback" not in local_run.stderr
    table = out[out.index("Finalized klines stored in") :]
    for symbol in SYMBOLS.split(","):
        assert re.search(rf"^{symbol}\s+1m\s+\d+", table, re.M), table
