"""The writer's pure pieces: the batch (offset ranges, token, rows, lines as fetched), column-fit checks, the two
writer specs, and what the engine reads back from a batch ClickHouse accepted."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import pytest

from services.core.models import InvalidInput, Kline
from services.shared.clickhouse import KLINE_COLUMNS
from services.shared.messages import encode_kline
from services.shared.settings import load_settings
from services.writers.batch import Batch, check_fits_table
from services.writers.contract import closes_of, corrections_of, framed
from services.writers.ports import DeadLetter
from services.writers.specs import (
    FINALIZED_RULE,
    WriterSpec,
    finalized_spec,
    finalized_version,
    snapshot_spec,
    snapshot_version,
)

pytestmark = pytest.mark.unit

T0 = 1_700_000_040_000  # a minute boundary


def kline(n: int = 0, *, x: bool = True, version: int = 0, close: str = "1.5") -> Kline:
    t = T0 + n * 60_000
    d = Decimal
    return Kline("BTCUSDT", "1m", t, t + 59_999, 1, 2, d("1"), d("2"), d("1"), d(close), d("3"), 3, x, d("4"),
                 d("1"), d("1"), version)  # fmt: skip


@dataclass
class _Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def filled(*records: tuple[int, int, bytes]) -> Batch:
    batch = Batch()
    for partition, offset, value in records:
        batch.add_row(partition, offset, value, kline(offset), 0, now=10.0)
    return batch


def test_token_names_partitions_and_offset_ranges_in_order() -> None:
    batch = filled((2, 40, b"a"), (0, 100, b"b"), (2, 80, b"c"), (0, 199, b"d"))
    token = batch.token("finalized")
    assert token.startswith("finalized:p0=100-199,p2=40-80#")
    assert len(token.split("#")[1]) == 8


def test_token_is_deterministic_and_depends_on_the_values() -> None:
    records = [(0, 5, b"x"), (1, 7, b"y")]
    assert filled(*records).token("f") == filled(*records).token("f")
    # Same offsets, other values (a topic deleted and re-created): another token, never a false "repeat".
    assert filled((0, 5, b"x"), (1, 7, b"z")).token("f") != filled(*records).token("f")


def test_next_offsets_cover_rows_dead_letters_and_skipped_records() -> None:
    batch = filled((0, 3, b"a"), (1, 10, b"b"))
    batch.add_dead(DeadLetter(None, b"{}", 0, 4, "bad"), b"bad", now=11.0)
    batch.add_skipped(1, 12, now=11.0)
    assert batch.next_offsets() == {0: 5, 1: 13}
    assert len(batch) == 4
    assert batch.opened_at == 10.0


def test_due_by_size_or_by_interval_since_the_first_record() -> None:
    batch = Batch()
    assert not batch.due(1000.0, buffer_size=2, flush_interval_s=1.0)  # empty: never due
    batch.add_row(0, 0, b"a", kline(), 0, now=5.0)
    assert not batch.due(5.5, buffer_size=2, flush_interval_s=1.0)
    assert batch.due(6.0, buffer_size=2, flush_interval_s=1.0)
    batch.add_row(0, 1, b"b", kline(1), 0, now=5.1)
    assert batch.due(5.1, buffer_size=2, flush_interval_s=1.0)


def test_rows_carry_version_and_provenance_in_column_order() -> None:
    batch = Batch()
    batch.add_row(2, 41, b"v", kline(3, version=7), 7, now=0.0)
    [row] = batch.rows("finalized:p2=41-41#0")
    named = dict(zip(KLINE_COLUMNS, row, strict=True))
    assert named["open_time"] == T0 + 3 * 60_000
    assert named["close"] == "1.5"  # decimals travel as their exact text; ClickHouse parses them
    assert named["version"] == 7
    assert (named["kafka_partition"], named["kafka_offset"], named["batch_token"]) == (2, 41, "finalized:p2=41-41#0")


def test_drop_partitions_forgets_their_records_ranges_and_letters() -> None:
    batch = filled((0, 1, b"a"), (1, 2, b"b"), (1, 3, b"c"))
    batch.add_dead(DeadLetter(None, b"{}", 1, 4, "bad"), b"bad", now=0.0)
    assert batch.drop_partitions([1, 5]) == 3
    assert batch.next_offsets() == {0: 2}
    assert [e[1] for e in batch.entries] == [1] and batch.dead == []
    assert batch.drop_partitions([0]) == 1
    assert batch.opened_at is None and len(batch) == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("q", Decimal("0.0000000000000000001")),
        ("v", Decimal("100000000000000000000")),
        ("c", Decimal("1E-19")),
        ("v", Decimal("1E+20")),
        ("Q", Decimal("-1")),
        ("V", Decimal("NaN")),
    ],
)
def test_values_that_do_not_fit_decimal_38_18_are_rejected(field: str, value: Decimal) -> None:
    k = kline()
    setattr(k, field, value)
    with pytest.raises(InvalidInput, match=f"'{field}'.*Decimal\\(38, 18\\)"):
        check_fits_table(k, 0)


def test_values_at_the_limits_fit() -> None:
    k = kline()
    k.v = Decimal("1.5000000000000000000000")  # more digits than the scale, but only zeros
    k.q = Decimal("99999999999999999999.999999999999999999")
    k.Q = Decimal("1E+19")
    k.V = Decimal("1.5E-17")
    check_fits_table(k, 2**64 - 1)
    with pytest.raises(InvalidInput, match="UInt64"):
        check_fits_table(k, 2**64)


def test_finalized_rows_use_the_kline_version_and_refuse_open_klines() -> None:
    assert finalized_version(kline(version=3), None) == 3
    assert finalized_version(kline(version=3), 99) == 3  # a seq, if any, is not the finalized version
    with pytest.raises(InvalidInput, match="not closed"):
        finalized_version(kline(x=False), None)


def test_snapshot_rows_use_the_sequence_and_need_one() -> None:
    assert snapshot_version(kline(x=False, version=3), 42) == 42
    with pytest.raises(InvalidInput, match="seq"):
        snapshot_version(kline(x=False), None)


def test_specs_come_from_the_settings_with_separate_groups() -> None:
    s = load_settings(
        persistence={"finalized_buffer_size": 11, "finalized_flush_interval_ms": 22, "snapshot_buffer_size": 33,
                     "snapshot_flush_interval_ms": 44},
    )  # fmt: skip
    fin, snap = finalized_spec(s), snapshot_spec(s)
    assert (fin.topic, fin.table, fin.buffer_size, fin.flush_interval_ms) == (
        s.kafka.topics.finalized, s.clickhouse.finalized_table, 11, 22)  # fmt: skip
    assert (snap.topic, snap.table, snap.buffer_size, snap.flush_interval_ms) == (
        s.kafka.topics.snapshots, s.clickhouse.snapshots_table, 33, 44)  # fmt: skip
    assert fin.group_id != snap.group_id
    assert snap.skip_tombstones and not fin.skip_tombstones


def test_spec_validates_its_flush_policy() -> None:
    with pytest.raises(ValueError, match="positive"):
        WriterSpec("f", "c", "t", "tbl", "g", 0, 10, finalized_version)


def test_a_batch_as_fetched_is_one_line_per_record_and_keeps_its_token_when_validated() -> None:
    records = [_Record("t", 1, 40 + n, b"k", encode_kline(kline(n, version=n % 2))) for n in range(3)]
    batch = Batch()
    assert batch.add_values(1, records, 0.0, skip_tombstones=False) == 0
    values = batch.values(FINALIZED_RULE)
    assert values.rows == 3 and framed(values.body, 3)
    assert values.body.splitlines()[0] == b"1\t40\t" + records[0].value  # type: ignore[operator]
    token = batch.token("finalized")
    assert token.startswith("finalized:p1=40-42#") and batch.next_offsets() == {1: 43}
    batch.validated([], [])
    assert not batch.has_values and batch.token("finalized") == token and len(batch) == 3


def test_tombstones_are_left_out_of_the_lines_but_counted_as_consumed() -> None:
    records = [_Record("t", 0, 0, b"k", encode_kline(kline(0, x=False), 1)), _Record("t", 0, 1, b"k", None)]
    batch = Batch()
    assert batch.add_values(0, records, 0.0, skip_tombstones=True) == 1
    assert batch.value_rows == 1 and len(batch) == 2 and batch.next_offsets() == {0: 2}
    assert batch.drop_partitions([0]) == 2 and batch.value_rows == 0 and not batch.has_values


def test_framing_refuses_values_with_a_tab_a_line_break_or_a_backslash() -> None:
    value = encode_kline(kline(0))
    assert framed(b"0\t0\t" + value + b"\n", 1)
    for bad in (b"\t", b"\n", b"\r", b"\\"):
        assert not framed(b"0\t0\t" + value.replace(b",", b"," + bad, 1) + b"\n", 1)


def test_closes_and_corrections_are_read_from_an_accepted_batch() -> None:
    body = b"".join(
        b"0\t%d\t%b\n" % (n, encode_kline(kline(n % 2, version=n % 3))) for n in range(6)
    )  # klines 0 and 1, three times each
    assert closes_of(body) == {("1m", kline(0).T): 3, ("1m", kline(1).T): 3}
    assert corrections_of(body, 6) == 4  # versions 1 and 2
