"""The text the writers send ClickHouse: exact decimals, escaped strings, a fast encoder equal to the generic one."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.models import Kline
from services.shared.clickhouse import (
    KLINE_COLUMNS,
    TEXT_COLUMNS,
    KlineRows,
    decimal_text,
    encode_rows,
    kline_row,
    kline_text,
)
from services.shared.messages import decode_kline_record, encode_kline

pytestmark = pytest.mark.unit

T0 = 1_735_689_600_000


def kline(n: int = 0, *, v: str = "3", symbol: str = "BTCUSDT") -> Kline:
    t = T0 + n * 60_000
    d = Decimal
    return Kline(symbol, "1m", t, t + 59_999, 1, 2, d("1"), d("2"), d("1"), d("1.5"), d(v), 3, True, d("4"), d("1"),
                 d("1"), n)  # fmt: skip


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("1E+3"), "1000"),
        (Decimal("1E-8"), "0.00000001"),
        (Decimal("0E-8"), "0.00000000"),
        (Decimal("1.5000000000000000000000"), "1.500000000000000000"),  # zeros beyond the scale are dropped
        (Decimal("99999999999999999999.999999999999999999"), "99999999999999999999.999999999999999999"),
        (Decimal("0.000000000000000001"), "0.000000000000000001"),
        (Decimal("1E+19"), "10000000000000000000"),
    ],
)
def test_decimal_text_is_exact_and_plain(value: Decimal, text: str) -> None:
    assert decimal_text(value) == text
    assert Decimal(text) == value


@pytest.mark.parametrize(
    "value",
    [Decimal("1E+20"), Decimal("0.0000000000000000001"), Decimal("NaN"), Decimal("Infinity"), Decimal("1.5E-19")],
)
def test_decimal_text_refuses_what_the_column_cannot_hold_exactly(value: Decimal) -> None:
    with pytest.raises(ValueError, match=r"finite|digits|decimals"):
        decimal_text(value)


def test_generic_rows_escape_strings_and_refuse_inexact_types() -> None:
    row = kline_row(kline(), version=1, partition=0, offset=5, token="a\tb\\c\nd")
    [line] = encode_rows([row]).decode().splitlines()
    fields = dict(zip(TEXT_COLUMNS, line.split("\t"), strict=True))
    assert fields["batch_token"] == "a\\tb\\\\c\\nd"
    assert (fields["symbol"], fields["close"], fields["version"], fields["kafka_offset"]) == (
        "BTCUSDT",
        "1.5",
        "1",
        "5",
    )
    for bad in (1.5, True, None):
        with pytest.raises(TypeError, match="cannot store"):
            encode_rows([(*row[:6], bad, *row[7:])])
    with pytest.raises(ValueError, match="20 values"):
        encode_rows([row[:-1]])


@given(
    st.lists(st.integers(0, 10**6), min_size=1, max_size=20),
    st.sampled_from(["finalized:p0=1-2#00ff00ff", "snap\\shot:p1=3-4#1"]),
)
@settings(max_examples=50)
def test_kline_rows_encode_like_the_generic_rows(ns: list[int], token: str) -> None:
    entries = []
    for offset, n in enumerate(ns):
        record = decode_kline_record(encode_kline(kline(n, v=f"{n + 1}.{n:018d}")))
        # Every other entry with the text made of the kline (as for the full path): the same text.
        assert record.text is not None and record.text == kline_text(record.kline)
        entries.append((offset % 3, offset, record.kline, n, record.text if offset % 2 else kline_text(record.kline)))
    rows = KlineRows(entries, token)
    assert rows.tsv() == encode_rows(list(rows))
    assert len(rows) == len(ns) and rows[0] == next(iter(rows)) and rows[:1] == [rows[0]]
    named = dict(zip(KLINE_COLUMNS, rows[-1], strict=True))
    assert named["volume"] == f"{ns[-1] + 1}.{ns[-1]:018d}" and named["batch_token"] == token


def test_kline_rows_refuse_a_kline_built_around_validation() -> None:
    k = kline(symbol="BTC\tUSDT")
    rows = KlineRows([(0, 0, k, 0, kline_text(k))], "t")
    with pytest.raises(ValueError, match="not validated"):
        rows.tsv()
