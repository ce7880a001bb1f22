"""The CLI's tools on real recordings and the real broker: ``klines replay`` (rebuild into ClickHouse),
``klines sql`` (tables, FORMAT, stdin), ``klines tail`` and ``klines topics`` (JSON lines, exact filters,
offsets, one-line errors)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from services.shared.kafka import TopicSpec, delete_topics, ensure_topics
from services.shared.settings import load_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TRX_TRADES = "TRXUSDT-UM-aggTrades-derived-2025-03-04_000004-001644.csv"
TRX_KLINES = "TRXUSDT-UM-1m-2025-03-04_0000-0016.csv"


def klines(*args: str, dsn: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO), **({"CLICKHOUSE_DSN": dsn} if dsn else {})}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin if stdin is not None else "",
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


# --- sql ------------------------------------------------------------------------------------------------------


def test_sql_passes_format_through_and_reads_stdin(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'ch'}"
    own = klines("sql", "SELECT 1 FORMAT JSONEachRow", dsn=dsn)
    assert (own.returncode, own.stdout, own.stderr) == (0, '{"1":1}\n', "")
    option = klines("sql", "SELECT 1 AS one, 'a' AS s", "--format", "CSVWithNames", dsn=dsn)
    assert (option.returncode, option.stdout) == (0, '"one","s"\n1,"a"\n')
    piped = klines("sql", dsn=dsn, stdin="SELECT 2 AS two;\n")
    assert (piped.returncode, piped.stdout.splitlines()) == (0, ["two", "---", "2"])
    dash = klines("sql", "-", "--format", "TSV", dsn=dsn, stdin="SELECT 3")
    assert (dash.returncode, dash.stdout) == (0, "3\n")


def test_sql_prints_decimals_without_trailing_zeros(tmp_path: Path) -> None:
    # --dsn after the subcommand, and no CLICKHOUSE_DSN in the environment.
    query = "SELECT toDecimal128('97000.1', 18) AS close, toDecimal128('0', 18) AS zero, toDecimal128('5', 18) AS v"
    result = klines("sql", query, "--dsn", f"chdb://{tmp_path / 'ch'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["close    zero  v", "-------  ----  -", "97000.1  0     5"]


def test_sql_errors_are_one_line(tmp_path: Path) -> None:
    bad = klines("sql", "SELECT nope", dsn=f"chdb://{tmp_path / 'ch'}")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "UNKNOWN_IDENTIFIER" in bad.stderr
    down = klines("--dsn", "http://127.0.0.1:1", "sql", "SELECT 1")
    assert down.returncode == 2 and down.stderr.count("\n") == 1
    assert "ClickHouse at http://127.0.0.1:1 is not reachable (Connection refused)" in down.stderr
    assert "--dsn, clickhouse.dsn" in down.stderr


# --- topics and tail --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["topics"], ["topics", "create"], ["tail", "trades", "-e"]])
def test_an_unreachable_broker_is_one_line_and_exit_2(argv: list[str]) -> None:
    result = klines(*argv, "-b", "127.0.0.1:1")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("klines: cannot reach Kafka at 127.0.0.1:1: check -b/--bootstrap")
    assert "Traceback" not in result.stderr and "Unclosed" not in result.stderr


@pytest.fixture
def keyed_topic(kafka_bootstrap: str) -> object:
    """A two-partition topic holding, in partition 0: ETH, ETHBTC, ETH|1m, ETH|5m, and in partition 1: ETHBTC|1m,
    ETH, a value that is not JSON; every value names its own key."""
    kafka = load_settings(kafka={"bootstrap": kafka_bootstrap}).kafka
    name = f"cli-tail-{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topics(kafka, [TopicSpec(name, 2, {})]))
    records = [(0, "ETH"), (0, "ETHBTC"), (0, "ETH|1m"), (0, "ETH|5m"), (1, "ETHBTC|1m"), (1, "ETH")]

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for partition, key in records:
                await producer.send_and_wait(
                    name, json.dumps({"k": key}).encode(), key=key.encode(), partition=partition
                )
            await producer.send_and_wait(name, b"not json", key=b"ETH", partition=1)
        finally:
            await producer.stop()

    asyncio.run(produce())
    yield name
    asyncio.run(delete_topics(kafka, [name]))


def tail(kafka_bootstrap: str, topic: str, *args: str) -> list[dict[str, object]]:
    result = klines("tail", topic, "-b", kafka_bootstrap, "-e", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_tail_json_lines_exact_symbol_to_the_end(kafka_bootstrap: str, keyed_topic: str) -> None:
    shown = tail(kafka_bootstrap, keyed_topic, "-o", "beginning", "--symbol", "eth")
    keys = sorted((r["partition"], r["offset"], r["key"]) for r in shown)
    assert keys == [(0, 0, "ETH"), (0, 2, "ETH|1m"), (0, 3, "ETH|5m"), (1, 1, "ETH"), (1, 2, "ETH")]
    by_key = {(r["partition"], r["offset"]): r["value"] for r in shown}
    assert by_key[(0, 2)] == {"k": "ETH|1m"} and by_key[(1, 2)] == "not json"
    assert all(r["topic"] == keyed_topic and isinstance(r["timestamp"], int) for r in shown)
    interval = tail(kafka_bootstrap, keyed_topic, "--from-beginning", "--symbol", "ETH", "--interval", "1m")
    assert [r["key"] for r in interval] == ["ETH|1m"]


def test_tail_partition_and_offsets(kafka_bootstrap: str, keyed_topic: str) -> None:
    one = tail(kafka_bootstrap, keyed_topic, "--partition", "1", "--offset", "beginning")
    assert [(r["partition"], r["offset"]) for r in one] == [(1, 0), (1, 1), (1, 2)]
    last_two = tail(kafka_bootstrap, keyed_topic, "-p", "0", "-o", "-2")
    assert [r["key"] for r in last_two] == ["ETH|1m", "ETH|5m"]
    from_offset = tail(kafka_bootstrap, keyed_topic, "-p", "0", "-o", "1", "-n", "1")
    assert [r["key"] for r in from_offset] == ["ETHBTC"]
    assert tail(kafka_bootstrap, keyed_topic) == []  # the default starts at the end: -e stops at once
    pretty = klines("tail", keyed_topic, "-b", kafka_bootstrap, "-e", "-p", "0", "-o", "-1", "--format", "pretty")
    assert pretty.returncode == 0, pretty.stderr
    lines = pretty.stdout.splitlines()
    assert lines[0].startswith(f"{keyed_topic}[0]@3  ETH|5m  ") and lines[1:] == ["  {", '    "k": "ETH|5m"', "  }"]


def test_tail_names_a_missing_topic_or_partition(kafka_bootstrap: str, keyed_topic: str) -> None:
    missing = klines("tail", f"{keyed_topic}-nope", "-b", kafka_bootstrap, "-e")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert f"no topic '{keyed_topic}-nope' on the Kafka at {kafka_bootstrap}" in missing.stderr
    partition = klines("tail", keyed_topic, "-b", kafka_bootstrap, "-e", "-p", "7")
    assert partition.returncode == 2
    assert partition.stderr.strip() == f"klines: topic '{keyed_topic}' has no partition 7 (it has 0, 1)"
