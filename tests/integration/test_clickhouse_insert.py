"""The write path against the real engine (chDB): TabSeparated text in, the exact values out, once per token."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from services.core.models import Kline
from services.shared import clickhouse
from services.shared.clickhouse import KlineRows
from services.shared.messages import decode_kline_record, encode_kline
from services.shared.settings import ClickHouseSettings, load_settings

pytestmark = pytest.mark.integration

T0 = 1_735_689_600_000
BIG = "99999999999999999999.999999999999999999"  # the largest Decimal(38, 18)
TINY = "0.000000000000000001"
DECIMALS = ("open", "high", "low", "close", "volume", "quote_volume", "taker_buy_volume", "taker_buy_quote_volume")


@pytest.fixture
def ch(tmp_path: Path) -> Iterator[ClickHouseSettings]:
    settings = load_settings(clickhouse={"dsn": f"chdb://{tmp_path / 'chdb'}", "database": "insert_test"}).clickhouse
    clickhouse.apply_schema(clickhouse.connect(settings), settings)
    yield settings
    clickhouse.close(settings)


def kline(n: int, o: str, h: str, low: str, c: str, v: str, q: str, taker_v: str, taker_q: str) -> Kline:
    t = T0 + n * 60_000
    d = Decimal
    return Kline("BTCUSDT", "1m", t, t + 59_999, 7 * n, 7 * n + 6, d(o), d(h), d(low), d(c), d(v), 7, True, d(q),
                 d(taker_v), d(taker_q), n)  # fmt: skip


EXAMPLES = [
    kline(0, "42000.12345678", "42001", "41999.99999999", "42000.5", "1.5", "63000.185185170000000001", "0.5", "0"),
    kline(1, "0.000000000000000002", "0.000000000000000003", TINY, TINY, BIG, BIG, BIG, "12345678901234567890.5"),
    kline(2, "1.100000000000000000", "1.123456789012345678", "1", "1.1", "0", "0", "0", "0"),
    kline(3, "99999999999999999999", BIG, "1", "5", "10000000000000000000", TINY, "1", TINY),
]


def stored(ch: ClickHouseSettings) -> list[tuple[object, ...]]:
    text_columns = ", ".join(f"toString({c})" for c in DECIMALS)
    return clickhouse.query_rows(
        clickhouse.connect(ch),
        f"SELECT open_time, {', '.join(DECIMALS)}, {text_columns}, version, kafka_partition, kafka_offset, "
        f"batch_token FROM {ch.database}.{ch.finalized_table} ORDER BY open_time, batch_token",
    )


def expected_decimals(k: Kline) -> list[Decimal]:
    return [k.o, k.h, k.l, k.c, k.v, k.q, k.V, k.Q]


def test_decoded_records_round_trip_exactly_and_a_repeated_token_adds_nothing(ch: ClickHouseSettings) -> None:
    client = clickhouse.connect(ch)
    entries = []
    for offset, k in enumerate(EXAMPLES):
        record = decode_kline_record(encode_kline(k))
        assert record.text is not None  # the fast path's text goes to ClickHouse as it is
        entries.append((1, 100 + offset, record.kline, k.version, record.text))
    token = "finalized:p1=100-103#0badcafe"
    for _ in range(3):  # a retried insert (unknown outcome) and a replayed batch: same token
        clickhouse.insert_klines(client, ch, ch.finalized_table, KlineRows(entries, token), token)
    rows = stored(ch)
    assert len(rows) == len(EXAMPLES)
    for row, k in zip(rows, EXAMPLES, strict=True):
        assert row[0] == k.t
        assert list(row[1:9]) == expected_decimals(k)  # Decimal(38, 18), numerically exact
        assert [Decimal(text) for text in row[9:17]] == expected_decimals(k)  # and as ClickHouse prints them
        assert row[17:] == (k.version, 1, 100 + EXAMPLES.index(k), token)


def test_generic_rows_store_the_same_values_and_a_new_token_is_a_new_insert(ch: ClickHouseSettings) -> None:
    client = clickhouse.connect(ch)
    rows = [
        clickhouse.kline_row(k, version=k.version, partition=0, offset=i, token="t\t1\\x")
        for i, k in enumerate(EXAMPLES)
    ]
    clickhouse.insert_klines(client, ch, ch.finalized_table, rows, "t\t1\\x")
    clickhouse.insert_klines(client, ch, ch.finalized_table, rows, "t\t1\\x")  # same token: nothing added
    assert [r[-1] for r in stored(ch)] == ["t\t1\\x"] * len(EXAMPLES)  # escaped on the way, intact in the table
    clickhouse.insert_klines(client, ch, ch.finalized_table, rows[:1], "another token")
    table = f"{ch.database}.{ch.finalized_table}"
    assert clickhouse.query_rows(client, f"SELECT count() FROM {table}") == [(len(EXAMPLES) + 1,)]
    assert clickhouse.query_rows(client, f"SELECT count() FROM {table} FINAL") == [(len(EXAMPLES),)]
    for row, k in zip(stored(ch), [EXAMPLES[0], *EXAMPLES], strict=True):
        assert list(row[1:9]) == expected_decimals(k)


def test_a_refused_insert_is_reported_as_retryable(ch: ClickHouseSettings) -> None:
    client = clickhouse.connect(ch)
    with pytest.raises(clickhouse.ClickHouseUnavailable, match="missing_table"):
        clickhouse.insert_tsv(client, ch, "missing_table", b"x\n", "t")
