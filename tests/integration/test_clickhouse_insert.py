"""The write paths against the real engine (chDB): TabSeparated rows in, the exact values out, once per token;
and the values as fetched, which ClickHouse parses and checks against the kline contract
(services/writers/contract.py), agreeing with the validating path.

What ClickHouse accepts is exactly what the validating path accepts, stored as the same row. The validating path
is the engine's own (``WriterEngine._decode_records``: decode, the spec's ``version_of``, the columns' ranges).
Records are valid klines as the aggregator encodes them, and the same klines broken or re-encoded in the ways the
contract is lenient or strict about: types, ranges, spans, prices, missing and duplicate fields, whitespace,
escapes, order. Whenever ClickHouse accepts a batch, every record in it is valid for the validating path and the
stored rows are the validating path's; whenever a batch is all canonical and valid, ClickHouse accepts it; and a
batch with one bad record among good ones ends with the good ones stored and only the bad one dead-lettered, with
its reason.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.intervals import INTERVALS, close_time, open_time
from services.core.models import MAX_ID, Kline
from services.shared import clickhouse
from services.shared.clickhouse import KLINE_COLUMNS, ClickHouseRejected, KlineRows
from services.shared.lifecycle import Shutdown
from services.shared.messages import decode_kline_record, encode_kline
from services.shared.settings import ClickHouseSettings, load_settings
from services.writers.contract import VALUES_STRUCTURE, KlineValues, framed, insert_statement
from services.writers.engine import WriterEngine
from services.writers.ports import DeadLetter, clickhouse_inserter
from services.writers.specs import FINALIZED_RULE, SNAPSHOT_RULE, WriterSpec, finalized_version, snapshot_version

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


def test_values_whose_insert_answer_is_lost_are_stored_once_when_retried_with_the_token(
    ch: ClickHouseSettings,
) -> None:
    client = clickhouse.LoseAnswers(clickhouse.connect(ch))
    insert = clickhouse_inserter(client, ch, ch.finalized_table)
    lines = b"".join(b"%d\t%d\t%b\n" % (2, 10 + n, encode_kline(k)) for n, k in enumerate(EXAMPLES))
    values = KlineValues(lines, len(EXAMPLES), FINALIZED_RULE)
    client.lose_next(1)
    with pytest.raises(clickhouse.ClickHouseUnavailable, match="answer to an executed insert was lost"):
        insert(values, "finalized:p2=10-13#00c0ffee")  # stored, but the writer cannot know
    insert(values, "finalized:p2=10-13#00c0ffee")  # the retry: same token
    rows = stored(ch)
    assert [(r[0], r[-3:]) for r in rows] == [
        (k.t, (2, 10 + n, "finalized:p2=10-13#00c0ffee")) for n, k in enumerate(EXAMPLES)
    ]
    for row, k in zip(rows, EXAMPLES, strict=True):
        assert list(row[1:9]) == expected_decimals(k)  # the values as sent, parsed by ClickHouse


def test_a_refused_insert_is_reported_as_retryable(ch: ClickHouseSettings) -> None:
    client = clickhouse.connect(ch)
    with pytest.raises(clickhouse.ClickHouseUnavailable, match="missing_table"):
        clickhouse.insert_tsv(client, ch, "missing_table", b"x\n", "t")


# --- values as fetched: the kline contract in ClickHouse agrees with the validating path ------------

TOPIC = "klines.test"
FINALIZED = WriterSpec("finalized", "finalized_writer", TOPIC, "klines_finalized", "g", 100, 1000,
                       finalized_version, closed_klines=True, rule=FINALIZED_RULE)  # fmt: skip
SNAPSHOT = WriterSpec("snapshot", "snapshot_writer", TOPIC, "klines_snapshots", "g", 100, 1000, snapshot_version,
                      skip_tombstones=True, rule=SNAPSHOT_RULE)  # fmt: skip
STORED = ", ".join(c for c in KLINE_COLUMNS if c != "batch_token")


@pytest.fixture(scope="module")
def contract_ch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseSettings]:
    path = tmp_path_factory.mktemp("contract") / "chdb"
    settings = load_settings(clickhouse={"dsn": f"chdb://{path}", "database": "contract_test"}).clickhouse
    client = clickhouse.connect(settings)
    clickhouse.apply_schema(client, settings)
    # No background merges: a merge would collapse rows of one kline from different batches (that is the
    # ReplacingMergeTree's job), and each check reads back exactly the rows its batch stored.
    for table in clickhouse.table_names(settings):
        client.command(
            f"ALTER TABLE {settings.database}.{table} MODIFY SETTING "
            "max_bytes_to_merge_at_max_space_in_pool = 1, max_bytes_to_merge_at_min_space_in_pool = 1"
        )
    yield settings
    clickhouse.close(settings)


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class _Idle:
    """A consumer and dead-letter sink that are never used: the validating path is called directly."""

    def assignment(self) -> set[Any]:
        return set()

    async def commit(self, offsets: Any = None) -> None:
        raise AssertionError("nothing is committed here")


def validating_path(spec: WriterSpec, values: Sequence[bytes | None]) -> tuple[list[tuple[Any, ...]], list[str]]:
    """The engine's own validating path over one fetched run: the rows it inserts (without the token) and the
    dead letters' reasons."""
    entries, reasons = validate(spec, values)
    return [normal(row[:-1]) for row in clickhouse.KlineRows(entries, "t")], reasons


def validate(spec: WriterSpec, values: Sequence[bytes | None]) -> tuple[list[Any], list[str]]:
    """The engine's own validating path over one fetched run: its row entries and its dead letters' reasons."""
    engine = WriterEngine(spec, _Idle(), insert=lambda rows, token: None, dead_letters=_Idle(),  # type: ignore[arg-type]
                          shutdown=Shutdown(1.0))  # fmt: skip
    records = [Record(TOPIC, 0, offset, b"k", value) for offset, value in enumerate(values)]
    entries, dead, _skipped = engine._decode_records(0, records)
    return entries, [d.reason for d in dead]


DECIMAL_AT = [
    n
    for n, c in enumerate(KLINE_COLUMNS)
    if c in ("open", "high", "low", "close", "volume", "quote_volume", "taker_buy_volume", "taker_buy_quote_volume")
]


def normal(row: Sequence[Any]) -> tuple[Any, ...]:
    """A row with its decimals as :class:`Decimal` (the validating path keeps their exact text)."""
    return tuple(Decimal(v) if n in DECIMAL_AT else v for n, v in enumerate(row))


@dataclass
class Table:
    """Inserts batches as fetched through the real write path and reads back what each stored."""

    ch: ClickHouseSettings
    spec: WriterSpec
    batches: int = 0
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # tokens of this table's own

    def insert(self, values: Sequence[bytes | None]) -> list[tuple[Any, ...]] | None:
        """The rows ClickHouse stored for the batch (its lines' order), or None when it refused the batch."""
        self.batches += 1
        token = f"{self.spec.name}:contract-{self.run}-{self.batches}"
        lines = b"".join(b"%d\t%d\t%b\n" % (0, offset, v or b"") for offset, v in enumerate(values))
        if not framed(lines, len(values)):
            return None  # a tab, line break or backslash in a value: the engine validates such a batch itself
        client = clickhouse.connect(self.ch)
        insert = clickhouse_inserter(client, self.ch, self.spec.table)
        try:
            insert(KlineValues(lines, len(values), self.spec.rule), token)
        except ClickHouseRejected:
            assert self._count(client, token) == 0  # refused whole: nothing of it stored
            return None
        return self._stored(client, token)

    def insert_validated(self, entries: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows ClickHouse stored for the validating path's rows of a batch."""
        self.batches += 1
        token = f"{self.spec.name}:validated-{self.run}-{self.batches}"
        client = clickhouse.connect(self.ch)
        clickhouse_inserter(client, self.ch, self.spec.table)(clickhouse.KlineRows(entries, token), token)
        return self._stored(client, token)

    def _stored(self, client: Any, token: str) -> list[tuple[Any, ...]]:
        rows = clickhouse.query_rows(
            client,
            f"SELECT {STORED} FROM {self.ch.database}.{self.spec.table} WHERE batch_token = {{t:String}} "
            "ORDER BY kafka_offset",
            {"t": token},
        )
        return [normal(row) for row in rows]

    def _count(self, client: Any, token: str) -> int:
        sql = f"SELECT count() FROM {self.ch.database}.{self.spec.table} WHERE batch_token = {{t:String}}"
        return int(clickhouse.query_rows(client, sql, {"t": token})[0][0])


# --- records: valid klines, then the same broken or re-encoded -------------------------------------------

MIN_T = 1_262_304_000_000  # 2010
MAX_T = 4_102_444_800_000  # 2100

decimals = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal("99999"), places=8)


@st.composite
def klines(draw: st.DrawFn) -> Kline:
    interval = draw(st.sampled_from(INTERVALS))
    t = open_time(interval, draw(st.integers(MIN_T, MAX_T - 40 * 86_400_000)))
    low, high = sorted(draw(st.lists(decimals, min_size=2, max_size=2)))
    o, c = (draw(st.sampled_from([low, high, (low + high) / 2])) for _ in range(2))
    v = draw(decimals)
    q = (v * c).quantize(Decimal("1E-16"))
    taker = draw(st.sampled_from([Decimal(0), Decimal("0.5"), Decimal(1)]))
    version = draw(st.sampled_from([0, 1, 7, 2**63 - 1]))
    source = draw(st.sampled_from(["live", "repaired", "empty"]))
    first = draw(st.integers(-1, 10**12))
    return Kline("BTCUSDT", interval, t, close_time(interval, t), first, first + draw(st.integers(0, 50)), o, high,
                 low, c, v, draw(st.integers(0, 10**6)), draw(st.booleans()), q, v * taker, q * taker, version,
                 source)  # fmt: skip


def canonical(kline: Kline, seq: int | None) -> bytes:
    return encode_kline(kline, seq)


def fields_of(value: bytes) -> list[tuple[str, str]]:
    """The (key, JSON text) pairs of a canonical value, in order."""
    obj = json.loads(value)
    return [(k, json.dumps(v, separators=(",", ":"))) for k, v in obj.items()]


def join(pairs: Sequence[tuple[str, str]], sep: str = ",", colon: str = ":") -> bytes:
    return ("{" + sep.join(f'"{k}"{colon}{v}' for k, v in pairs) + "}").encode()


def replace(pairs: list[tuple[str, str]], key: str, text: str) -> list[tuple[str, str]]:
    return [(k, text if k == key else v) for k, v in pairs]


MUTATIONS: dict[str, Any] = {
    "quoted integer": lambda p, d: replace(p, d(st.sampled_from(["t", "T", "f", "L", "n"])), '"60000"'),
    "integer with a fraction": lambda p, d: replace(p, d(st.sampled_from(["t", "n", "version"])), "0.0"),
    "integer as exponent": lambda p, d: replace(p, "n", "1e3"),
    "leading zero": lambda p, d: replace(p, "n", "07"),
    "negative count": lambda p, d: replace(p, "n", "-1"),
    "trade id below -1": lambda p, d: replace(p, "f", "-2"),
    "integer past int64": lambda p, d: replace(p, d(st.sampled_from(["t", "T", "n", "L"])), str(MAX_ID + 1)),
    "huge version": lambda p, d: replace(p, "version", str(2**64)),
    "boolean as integer": lambda p, d: replace(p, "x", "1"),
    "integer as boolean": lambda p, d: replace(p, "n", "true"),
    "null field": lambda p, d: replace(p, d(st.sampled_from(["t", "s", "o", "x", "version", "source"])), "null"),
    "missing field": lambda p, d: [kv for kv in p if kv[0] != d(st.sampled_from([k for k, _ in p]))],
    "duplicate field": lambda p, d: [*p, (lambda kv: (kv[0], kv[1]))(d(st.sampled_from(p)))],
    "duplicate with another value": lambda p, d: [("h", '"0.00000001"'), *p],
    "reordered": lambda p, d: list(reversed(p)),
    "extra field": lambda p, d: [*p, ("extra", '"ignored"')],
    "whitespace": lambda p, d: p,  # joined with spaces below
    "lower-case symbol": lambda p, d: replace(p, "s", '"btcusdt"'),
    "escaped symbol": lambda p, d: replace(p, "s", '"BTC\\u0055SDT"'),
    "unknown interval": lambda p, d: replace(p, "i", '"2m"'),
    "unknown source": lambda p, d: replace(p, "source", '"guess"'),
    "decimal as number": lambda p, d: replace(p, d(st.sampled_from(["o", "v", "q"])), "5"),
    "decimal with 19 places": lambda p, d: replace(p, "Q", '"0.0000000000000000001"'),
    "decimal with zeros past 18 places": lambda p, d: replace(p, "Q", '"0.0000000000000000000"'),
    "decimal with 21 integer digits": lambda p, d: replace(p, "v", '"100000000000000000000"'),
    "decimal with exponent": lambda p, d: replace(p, "h", '"1E+9"'),
    "decimal with a sign": lambda p, d: replace(p, "o", '"+1"'),
    "decimal with a leading zero": lambda p, d: replace(p, "h", '"0099999999"'),
    "zero low": lambda p, d: replace(p, "l", '"0"'),
    "open above high": lambda p, d: replace(p, "o", '"999999999"'),
    "close below low": lambda p, d: replace(p, "c", '"0.000000001"'),
    "taker volume above volume": lambda p, d: replace(p, "V", '"999999999"'),
    "taker quote above quote": lambda p, d: replace(p, "Q", '"99999999999999"'),
    "open time off its interval": lambda p, d: replace(p, "t", str(int(dict(p)["t"]) + 1)),
    "close time off": lambda p, d: replace(p, "T", str(int(dict(p)["T"]) + d(st.sampled_from([-1, 1, 86_400_000])))),
    "open kline": lambda p, d: replace(p, "x", "false"),
    "no seq": lambda p, d: [kv for kv in p if kv[0] != "seq"],
    "seq null": lambda p, d: [*[kv for kv in p if kv[0] != "seq"], ("seq", "null")],
    "seq negative": lambda p, d: [*[kv for kv in p if kv[0] != "seq"], ("seq", "-1")],
    "seq past uint64": lambda p, d: [*[kv for kv in p if kv[0] != "seq"], ("seq", str(2**64))],
}


@st.composite
def values(draw: st.DrawFn) -> bytes | None:
    kline = draw(klines())
    seq = None if draw(st.integers(0, 4)) == 0 else draw(st.integers(0, 2**63 - 1))
    value = canonical(kline, seq)
    if draw(st.integers(0, 9)) < 7:  # most records are valid, as on a real topic
        return value
    kind = draw(st.sampled_from([*MUTATIONS, "garbage", "tombstone", "trailing"]))
    if kind == "garbage":
        return draw(st.sampled_from([b"", b"{}", b"[]", b"null", b"{not json", b"\xff\xfe", b"1"]))
    if kind == "tombstone":
        return None
    if kind == "trailing":
        return value + draw(st.sampled_from([b" ", b"x", b"}", b",{}"]))
    pairs = MUTATIONS[kind](fields_of(value), draw)
    return join(pairs, ", ", " : ") if kind == "whitespace" else join(pairs)


@pytest.mark.parametrize("spec", [FINALIZED, SNAPSHOT], ids=["finalized", "snapshot"])
def test_what_clickhouse_accepts_is_what_the_validating_path_accepts_row_for_row(
    contract_ch: ClickHouseSettings, spec: WriterSpec
) -> None:
    table = Table(contract_ch, spec)
    accepted = refused = 0

    @settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(values(), min_size=1, max_size=3))
    def check(batch: list[bytes | None]) -> None:
        nonlocal accepted, refused
        if spec.skip_tombstones:
            batch = [v for v in batch if v is not None] or [b"{}"]
        entries, reasons = validate(spec, batch)
        stored = table.insert(batch)
        if stored is not None:
            accepted += 1
            assert reasons == [], f"ClickHouse stored a batch the validating path rejects: {reasons} {batch}"
            # The same rows as the validating path's, stored the same way (two versions of one kline in a batch
            # collapse on insert in both).
            assert stored == table.insert_validated(entries)
        else:
            refused += 1
            shapes = [v is not None and v == _recanonical(v) for v in batch]
            # A refused batch holds a record the validating path rejects, or one not in the canonical shape.
            assert reasons or not all(shapes), f"a canonical valid batch was refused: {batch}"

    check()
    assert accepted > 10 and refused > 10, (accepted, refused)  # both outcomes were exercised


def _recanonical(value: bytes) -> bytes | None:
    """The canonical encoding of ``value`` when the validating path reads it as a kline the contract's shape
    holds (integers of at most 19 digits, a 1M kline before 2100), else None."""
    try:
        obj = json.loads(value)
        seq = obj.pop("seq", None)
        kline = Kline.from_dict(obj)
    except Exception:
        return None
    if any(abs(n) >= 10**19 for n in (kline.t, kline.T, kline.f, kline.L, kline.n, kline.version, seq or 0)):
        return None
    if kline.i == "1M" and kline.t >= MAX_T:
        return None
    return canonical(kline, seq)


def test_monthly_and_weekly_spans_agree_with_the_interval_calendar(contract_ch: ClickHouseSettings) -> None:
    """Every month of 2010-2099 (leap Februaries included) and weeks around the epoch's Thursday: each open time
    is accepted with its close time and refused one millisecond off, as is_kline_span says."""
    table = Table(contract_ch, FINALIZED)
    base = Kline("BTCUSDT", "1M", 0, 0, 1, 2, Decimal(1), Decimal(2), Decimal(1), Decimal(1), Decimal(1), 1, True,
                 Decimal(1), Decimal(0), Decimal(0))  # fmt: skip
    good, shifted = [], []
    t = open_time("1M", MIN_T)
    while t < MAX_T:
        base.t, base.T = t, close_time("1M", t)
        good.append(encode_kline(base))
        base.T += 1
        shifted.append(encode_kline(base))
        t = close_time("1M", t) + 1
    week = open_time("1w", 345_600_000 + 10 * 604_800_000)
    base.i, base.t, base.T = "1w", week, close_time("1w", week)
    good.append(encode_kline(base))
    base.t, base.T = week - 86_400_000, week + 604_800_000 - 86_400_000 - 1  # an epoch-aligned "week"
    shifted.append(encode_kline(base))
    stored = table.insert(good)
    assert stored is not None and len(stored) == len(good) > 1000
    assert stored == validating_path(FINALIZED, good)[0]
    for value in shifted[::97] + shifted[-1:]:
        assert table.insert([value]) is None
        assert validating_path(FINALIZED, [value])[1]


class _Consumer:
    """One scripted fetch of one partition, then nothing; commits recorded."""

    def __init__(self, values: Sequence[bytes | None]) -> None:
        self.tp = TopicPartition(TOPIC, 0)
        self.records = [Record(TOPIC, 0, offset, b"BTCUSDT|1m", v) for offset, v in enumerate(values)]
        self.committed: dict[Any, tuple[int, str]] = {}

    async def getmany(self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        records, self.records = self.records, []
        if not records:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        return {self.tp: records}

    def assignment(self) -> set[Any]:
        return {self.tp}

    def pause(self, *partitions: Any) -> None:
        pass

    def resume(self, *partitions: Any) -> None:
        pass

    def highwater(self, partition: Any) -> int | None:
        return None

    async def commit(self, offsets: Any = None) -> None:
        self.committed.update(offsets)


class _Letters:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def deliver(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)


def test_one_bad_record_among_good_ones_is_dead_lettered_alone_and_the_rest_stored(
    contract_ch: ClickHouseSettings,
) -> None:
    good = [encode_kline(k) for k in _good_klines(60)]
    bad = json.dumps({**json.loads(good[30]), "h": "0.5"}).encode()  # high below open
    values = [*good[:30], bad, *good[30:]]
    client = clickhouse.connect(contract_ch)
    attempts: list[str] = []
    real = clickhouse_inserter(client, contract_ch, FINALIZED.table)

    def insert(rows: Any, token: str) -> None:
        attempts.append(type(rows).__name__)
        real(rows, token)

    consumer = _Consumer(values)
    letters = _Letters()
    shutdown = Shutdown(5.0)
    engine = WriterEngine(FINALIZED, consumer, insert=insert, dead_letters=letters, shutdown=shutdown,
                          parse_in_clickhouse=True, poll_timeout_s=0.01)  # fmt: skip

    async def run() -> None:
        task = asyncio.create_task(engine.run())
        while not consumer.committed:
            await asyncio.sleep(0.01)
        shutdown.request("test")
        await task

    asyncio.run(run())
    # ClickHouse refused the batch as fetched, then the validating path stored the valid rows.
    assert attempts == ["KlineValues", "KlineRows"]
    assert [(d.offset, d.reason) for d in letters.letters] == [
        (30, "inconsistent prices: o=" + json.loads(good[30])["o"] + " h=0.5 l=" + json.loads(good[30])["l"]
         + " c=" + json.loads(good[30])["c"] + " (need 0 < l <= o,c <= h)")
    ]  # fmt: skip
    assert consumer.committed[consumer.tp][0] == len(values)
    table = f"{contract_ch.database}.{FINALIZED.table}"
    [(token,)] = clickhouse.query_rows(
        client, f"SELECT DISTINCT batch_token FROM {table} WHERE batch_token LIKE 'finalized:p0=0-60#%'"
    )
    stored = clickhouse.query_rows(
        client, f"SELECT {STORED} FROM {table} WHERE batch_token = {{t:String}} ORDER BY kafka_offset", {"t": token}
    )
    assert consumer.committed[consumer.tp][1] == token
    assert [normal(r) for r in stored] == validating_path(FINALIZED, values)[0]
    assert len(stored) == len(good)
    assert engine.counters.get("dead_letters") == 1 and engine.counters.get("rows_inserted") == len(good)


def _good_klines(count: int) -> list[Kline]:
    d = Decimal
    out = []
    for n in range(count):
        t = 1_700_000_040_000 + n * 60_000
        out.append(Kline("ETHUSDT", "1m", t, t + 59_999, n, n + 3, d("2000.5"), d("2001"), d("1999.25"), d("2000"),
                         d("3.5"), 4, True, d("7000"), d("1"), d("2000"), n % 3))  # fmt: skip
    return out


def test_the_statement_names_every_column_once() -> None:
    statement = insert_statement("db", "t", FINALIZED_RULE)
    assert statement.startswith(f"INSERT INTO db.t ({', '.join(KLINE_COLUMNS)}) SELECT ")
    assert "{source}" in statement and "{token}" in statement
    assert VALUES_STRUCTURE.split(", ")[2] == "value String"
