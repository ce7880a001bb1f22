"""The local run command, as a user starts it, against the replay exchange, checked with ``klines verify``.

``local_run``: ``klines run --offline ... --until-exhausted --verify`` on a generated market of several symbols,
accelerated, with the real broker and embedded ClickHouse. The run's own ``verify`` compares every stored
finalized kline with the exchange's REST klines, for every symbol and interval, field by field.

``trx_runs``: the real USD-M TRXUSDT recording at full speed, then a second run with other intervals in the same
state directory, ClickHouse directory and ports, with no cleanup between them. The first run's stored 1m klines
must equal Binance's own published klines exactly, and its summary must report nothing lost.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from harness import isolated_env
from ports import free_port

from services.shared import clickhouse
from services.shared.settings import ClickHouseSettings

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = "BTCUSDT,ETHUSDT,SOLUSDT"
INTERVALS = "1m,3m,5m,15m"


@pytest.fixture(scope="module")
def local_run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    env = isolated_env(kafka_bootstrap, tmp_path_factory.mktemp("run-state"))
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


TRX_TRADES = "TRXUSDT-UM-aggTrades-derived-2025-03-04_000004-001644.csv"
TRX_KLINES = "TRXUSDT-UM-1m-2025-03-04_0000-0016.csv"
TRX_FIELDS = ("open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume", "trade_count",
              "taker_buy_volume", "taker_buy_quote_volume")  # fmt: skip
#: The same fields in data.binance.vision's kline CSV.
TRX_CSV_COLUMNS = ("open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume", "count",
                   "taker_buy_volume", "taker_buy_quote_volume")  # fmt: skip
#: The recording ends at 00:16:44: the 00:16 kline is still open, 00:00-00:15 are the 16 closed ones.
TRX_FIRST_OPEN_KLINE = 1741047360000


@dataclass
class TrxRuns:
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]
    dsn: str


def trx_run(env: dict[str, str], data_dir: Path, intervals: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "services.cli", "run", "--offline", "--file", f"{data_dir / TRX_TRADES}:TRXUSDT",
        "--venue", "usdm", "--speed", "0", "--until-exhausted", "--intervals", intervals, "--verify",
        "--replay-port", str(free_port()),
    ]  # fmt: skip
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trx_runs(kafka_bootstrap: str, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrxRuns:
    """Two runs one after the other in the same state, ClickHouse directory, topic names and ports."""
    env = isolated_env(kafka_bootstrap, tmp_path_factory.mktemp("trx-state"))
    first = trx_run(env, data_dir, "1m")
    second = trx_run(env, data_dir, "3m,5m")
    return TrxRuns(first, second, env["CLICKHOUSE_DSN"])


def stored_database(out: str) -> str:
    match = re.search(r"^Finalized klines stored in \S+ \((\w+)\.klines_finalized\):", out, re.M)
    assert match, out
    return match.group(1)


def binance_klines(data_dir: Path) -> dict[int, tuple[Decimal | int, ...]]:
    with (data_dir / TRX_KLINES).open() as f:
        rows = list(csv.DictReader(f))
    wanted = {}
    for row in rows:
        values: list[object] = [row[name] for name in TRX_CSV_COLUMNS]
        if int(row["open_time"]) < TRX_FIRST_OPEN_KLINE:
            wanted[int(row["open_time"])] = _normal(values)
    assert len(wanted) == 16
    return wanted


def _normal(values: list[object]) -> tuple[Decimal | int, ...]:
    ints = {0, 6, 8}
    return tuple(int(str(v)) if i in ints else Decimal(str(v)).normalize() for i, v in enumerate(values))


def stored_klines(dsn: str, database: str) -> list[tuple[object, ...]]:
    ch = ClickHouseSettings(dsn=dsn, database=database)
    client = clickhouse.connect(ch)
    try:
        return clickhouse.query_rows(
            client,
            f"SELECT symbol, interval, {', '.join(TRX_FIELDS)} FROM {database}.klines_finalized FINAL "
            "ORDER BY symbol, interval, open_time",
        )
    finally:
        clickhouse.close(ch)


def test_the_trx_recording_runs_to_binance_s_own_klines(trx_runs: TrxRuns, data_dir: Path) -> None:
    out = trx_runs.first.stdout
    assert trx_runs.first.returncode == 0, f"stdout:\n{out}\nstderr:\n{trx_runs.first.stderr}"
    assert "verify OK: 16 klines checked over 1 symbol×interval pairs, 0 mismatches, 0 gaps, 0 extras" in out
    summary = out[out.index("\nSummary:") :]
    assert "  trades: sent 9999 (exchange), published 9999 (ingest), applied 9999 (aggregator)" in summary
    assert "  klines: finalized 16 (aggregator), stored 16 (ClickHouse, FINAL)" in summary
    assert "  DATA_LOSS: 0\n" in summary
    assert "  ingest held/dropped: 0 held at stop and dropped, 0 dropped otherwise" in summary
    assert "result: OK, nothing lost" in summary
    assert "Traceback" not in out + trx_runs.first.stderr
    # Read after the run (and after the second one: a later run leaves this one's klines alone).
    rows = stored_klines(trx_runs.dsn, stored_database(out))
    assert {(r[0], r[1]) for r in rows} == {("TRXUSDT", "1m")}
    stored = {int(str(r[2])): _normal(list(r[2:])) for r in rows}
    assert stored == binance_klines(data_dir)


def test_a_second_run_with_other_intervals_just_works(trx_runs: TrxRuns) -> None:
    out = trx_runs.second.stdout
    assert trx_runs.second.returncode == 0, f"stdout:\n{out}\nstderr:\n{trx_runs.second.stderr}"
    assert "verify OK: 8 klines checked over 2 symbol×interval pairs, 0 mismatches, 0 gaps, 0 extras" in out
    assert "  DATA_LOSS: 0\n" in out
    assert "result: OK, nothing lost" in out
    database = stored_database(out)
    assert database != stored_database(trx_runs.first.stdout)
    rows = stored_klines(trx_runs.dsn, database)
    # 00:00-00:15 closed: 3m klines at 00, 03, 06, 09, 12; 5m at 00, 05, 10 (00:15 closes at 00:18 / 00:20).
    assert sorted((r[1], int(str(r[2])) - 1741046400000) for r in rows) == sorted(
        [("3m", m * 60_000) for m in (0, 3, 6, 9, 12)] + [("5m", m * 60_000) for m in (0, 5, 10)]
    )


def test_a_run_started_elsewhere_keeps_its_relative_clickhouse_directory_there(
    kafka_bootstrap: str, data_dir: Path, tmp_path: Path
) -> None:
    """The default ``chdb:.state/chdb`` is relative to the directory ``klines run`` is started in, for the run and
    for every service it starts (they run from the repository): before, the schema went to one directory and the
    writers looked in the other, so a run started outside the repository stopped with "table ... does not
    exist"."""
    env = isolated_env(kafka_bootstrap, tmp_path / "state")
    del env["CLICKHOUSE_DSN"]  # the default, as a newcomer has it
    env["PYTHONPATH"] = str(REPO)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = trx_run(env, data_dir, "1m", cwd=elsewhere)
    out = run.stdout
    assert run.returncode == 0, f"stdout:\n{out}\nstderr:\n{run.stderr}"
    assert "verify OK: 16 klines checked over 1 symbol×interval pairs, 0 mismatches, 0 gaps, 0 extras" in out
    assert f"Finalized klines stored in chdb://{elsewhere / '.state' / 'chdb'} " in out
    assert len(stored_klines(f"chdb://{elsewhere / '.state' / 'chdb'}", stored_database(out))) == 16
