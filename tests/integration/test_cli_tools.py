"""The CLI's offline tools on real recordings: ``klines replay`` (rebuild into ClickHouse) and ``klines sql``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TRX_TRADES = "TRXUSDT-UM-aggTrades-derived-2025-03-04_000004-001644.csv"
TRX_KLINES = "TRXUSDT-UM-1m-2025-03-04_0000-0016.csv"


def klines(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "CLICKHOUSE_DSN": dsn, "HOME": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_replay_rebuilds_binance_klines_exactly_and_idempotently(data_dir: Path, tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'ch'}"
    trades = str(data_dir / TRX_TRADES)
    first = klines(
        "replay", f"{trades}:TRXUSDT", "--intervals", "1m,5m", "--compare", str(data_dir / TRX_KLINES), dsn=dsn
    )
    assert first.returncode == 0, first.stderr
    assert "TRXUSDT: 16 × 1m, 3 × 5m closed klines stored" in first.stdout
    assert "compare OK: 16 reference klines, 0 differ" in first.stdout
    assert "100.0% 9999/9999 trades" in first.stderr  # the progress bar reached the end

    again = klines("replay", f"{trades}:TRXUSDT", "--intervals", "1m,5m", dsn=dsn)
    assert again.returncode == 0, again.stderr
    counted = klines(
        "sql", "SELECT interval, count() AS raw FROM klines.klines_finalized GROUP BY interval ORDER BY interval",
        dsn=dsn,
    )  # fmt: skip
    assert counted.returncode == 0, counted.stderr
    rows = [line.split() for line in counted.stdout.splitlines()[2:]]
    assert rows == [["1m", "16"], ["5m", "3"]]  # the second replay stored nothing: same dedup tokens


def test_replay_reports_a_difference_from_the_reference(data_dir: Path, tmp_path: Path) -> None:
    # Drop one trade of minute 00:03: the rebuilt 1m kline must now differ from Binance's.
    lines = (data_dir / TRX_TRADES).read_text().splitlines()
    minute_3 = [i for i, line in enumerate(lines[1:], 1) if 1741046580000 <= int(line.split(",")[5]) < 1741046640000]
    damaged = tmp_path / "TRXUSDT-damaged.csv"
    damaged.write_text("\n".join(lines[: minute_3[5]] + lines[minute_3[5] + 1 :]) + "\n")
    result = klines(
        "replay", f"{damaged}:TRXUSDT", "--intervals", "1m", "--dry-run", "--compare", str(data_dir / TRX_KLINES),
        dsn=f"chdb://{tmp_path / 'ch'}",
    )  # fmt: skip
    assert result.returncode == 1
    assert "compare FAILED: 16 reference klines, 1 differ" in result.stdout
    assert "mismatch: 1741046580000:" in result.stdout and "n 500 != 501" in result.stdout


def test_bad_input_gets_one_line(tmp_path: Path) -> None:
    missing = klines("replay", str(tmp_path / "nope.csv"), dsn=f"chdb://{tmp_path / 'ch'}")
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"klines: no such aggTrades file: {tmp_path / 'nope.csv'}"
    unreachable = klines("sql", "SELECT 1", dsn="http://127.0.0.1:1")
    assert unreachable.returncode == 2
    assert unreachable.stderr.count("\n") == 1 and "ClickHouse at http://127.0.0.1:1" in unreachable.stderr


def readme_sql() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = text.split("```sql\n")[1:]
    statements = []
    for block in blocks:
        body = block.split("```", 1)[0]
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        statements += [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
    return statements


def test_the_readme_sql_examples_run(data_dir: Path, tmp_path: Path) -> None:
    statements = readme_sql()
    assert len(statements) >= 4
    dsn = f"chdb://{tmp_path / 'ch'}"
    stored = klines("replay", f"{data_dir / TRX_TRADES}:TRXUSDT", "--intervals", "1m,5m", dsn=dsn)
    assert stored.returncode == 0, stored.stderr
    for sql in statements:
        result = klines("sql", sql, dsn=dsn)
        assert result.returncode == 0, f"{sql}\n{result.stderr}"
    latest = klines("sql", statements[0], dsn=dsn)
    assert latest.stdout.splitlines()[2].startswith("TRXUSDT  2025-03-04 00:15:00")
