"""The kline contract as ClickHouse checks it: the writers' insert that needs no Python per row.

A writer hands ClickHouse the values it fetched as they are, one ``TabSeparated`` line per record (partition,
offset, the value), and one ``INSERT ... SELECT`` (:func:`insert_statement`) parses and checks them and stores
the rows. The check is exact, not a cheaper approximation of the validating path
(:func:`~services.shared.messages.decode_kline_record`, :meth:`~services.core.models.Kline.from_dict`, the spec's
``version_of`` and the columns' ranges): ClickHouse accepts a batch only when the validating path would accept
every one of its records and store the same row; otherwise its ``throwIf`` refuses the whole batch (one block:
nothing is stored), and the writer validates that batch in Python, which stores the good records and dead-letters
the bad ones with their reasons. So a record's fate never depends on which path ran.

How the check is made exact. ClickHouse's JSON readers are lenient where the contract is not (a quoted number
read into an integer column, ``1.0`` into a ``Decimal``, a leading zero, a missing field as its default,
duplicate keys), so the SELECT does not use them. It first matches the whole value against
:data:`CANONICAL_PATTERN`: the exact bytes :func:`~services.shared.messages.encode_kline` writes (fields in its
order, no whitespace, no escapes; a symbol as stored, a known interval and source, plain decimals that
``Decimal(38, 18)`` holds exactly, integers of at most 19 digits). Every text of that shape is valid JSON that
:func:`json.loads` reads into exactly those fields with exactly those types, so what is left are the checks on
values, and ClickHouse makes each of them as the validating path does, in exact arithmetic (``Int128``,
``Decimal128``):

* integers within the contract's ranges (``t T n`` 0 .. 2^63 - 1, ``f L`` -1 .. 2^63 - 1; ``version`` and
  ``seq`` fit ``UInt64`` by their length);
* ``t`` an open time of ``i`` and ``T`` its close time (:func:`~services.core.intervals.is_kline_span`): epoch-
  aligned sizes, the week's four-day offset, and for ``1M`` the calendar month, with ClickHouse's calendar, which
  is checked up to 2100 (:data:`MONTH_CHECK_LIMIT_MS`);
* ``0 < l <= o, c <= h``, ``V <= v``, ``Q <= q``;
* the spec's rule (:class:`RowRule`): a finalized kline is closed, a snapshot has a ``seq``, which is its version.

What this leaves to the validating path, by refusing the batch (each is rare, and valid or not as Python says):
any other encoding of a valid kline (fields in another order, whitespace, escapes, a lower-case symbol, a decimal
sent as a JSON number or with more than 18 decimals or 20 integer digits, an integer of 20 digits), a ``1M``
kline past 2100, and every invalid record. Values with a tab, a line break or a backslash would change the
``TabSeparated`` framing, so such a batch does not go to ClickHouse at all (:func:`framed`).

``tests/integration/test_clickhouse_insert.py`` holds the two paths together on valid and invalid records.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from services.core.intervals import INTERVALS, interval_ms, open_time
from services.core.models import KLINE_SOURCES, MAX_ID, SYMBOL_PATTERN
from services.shared.clickhouse import KLINE_COLUMNS, REJECTED_MARKER, sql_string

#: The columns of the text a writer sends: one line per record.
VALUES_STRUCTURE = "kafka_partition Int32, kafka_offset Int64, value String"
#: ``1M`` spans are checked with ClickHouse's calendar up to 2100-01-01 (its ``DateTime`` ends in 2106); a later
#: monthly kline is left to the validating path.
MONTH_CHECK_LIMIT_MS = 4_102_444_800_000

_INT = r"(?:0|[1-9][0-9]{0,18})"
_TRADE_ID = r"(?:-1|0|[1-9][0-9]{0,18})"
_DECIMAL = r'"(?:0|[1-9][0-9]{0,19})(?:\.[0-9]{1,18})?"'
_FIELDS = (
    ("t", _INT),
    ("T", _INT),
    ("s", f'"{SYMBOL_PATTERN}"'),
    ("i", '"(?:' + "|".join(sorted(INTERVALS, key=len, reverse=True)) + ')"'),
    ("f", _TRADE_ID),
    ("L", _TRADE_ID),
    ("o", _DECIMAL),
    ("c", _DECIMAL),
    ("h", _DECIMAL),
    ("l", _DECIMAL),
    ("v", _DECIMAL),
    ("n", _INT),
    ("x", "(?:true|false)"),
    ("q", _DECIMAL),
    ("V", _DECIMAL),
    ("Q", _DECIMAL),
    ("version", _INT),
    ("source", '"(?:' + "|".join(sorted(KLINE_SOURCES)) + ')"'),
)
#: A ``klines.*`` value exactly as :func:`~services.shared.messages.encode_kline` writes it (``seq`` optional).
CANONICAL_PATTERN = r"^\{" + ",".join(f'"{name}":{pattern}' for name, pattern in _FIELDS) + rf'(?:,"seq":{_INT})?\}}$'
#: Position (1-based, ClickHouse arrays) of each field's text among the value's comma-separated fields.
_AT = {name: n for n, (name, _pattern) in enumerate([*_FIELDS, ("seq", _INT)], start=1)}


@dataclass(frozen=True, slots=True)
class RowRule:
    """What a writer's ``version_of`` says about a record, for ClickHouse to check: whether the kline must be
    closed, and whether the row's version is the record's ``seq`` (required) instead of the kline's ``version``."""

    closed_only: bool
    version_from_seq: bool


@dataclass(frozen=True, slots=True)
class KlineValues:
    """A batch's records as ClickHouse receives them: ``body`` holds ``rows`` lines of partition, offset and value
    (:data:`VALUES_STRUCTURE`), to be parsed and checked under ``rule``."""

    body: bytes
    rows: int
    rule: RowRule

    def __len__(self) -> int:
        return self.rows


def framed(body: bytes, rows: int) -> bool:
    """Whether ``body`` is exactly ``rows`` lines of three ``TabSeparated`` fields with nothing ClickHouse would
    unescape: the values carry no tab, line break or backslash (a valid kline's canonical text never does)."""
    return len(body) - len(body.translate(None, b"\t\n\r\\")) == 3 * rows


def _field(name: str) -> str:
    return f"a[{_AT[name]}]"


def _span_check() -> str:
    """``is_kline_span(i, t, T)`` in SQL: see :func:`~services.core.intervals.is_kline_span`. A fixed-size
    interval's size and offset come from one lookup (not a branch per interval, each a pass over the batch)."""
    names, sizes, offsets = [], [], []
    for interval in INTERVALS:
        ms = interval_ms(interval)
        if ms is not None:
            names.append(f"'{interval}'")
            sizes.append(str(ms))
            offsets.append(str(open_time(interval, 0) % ms))
    size = f"transform(i, [{', '.join(names)}], [{', '.join(sizes)}], 0)"
    offset = f"transform(i, [{', '.join(names)}], [{', '.join(offsets)}], 0)"
    # greatest(): a modulo by 0 would fail the insert with an error of its own, not refuse it, wherever a
    # server evaluates both branches of the if().
    fixed = f"(t - {offset}) % greatest({size}, 1) = 0 AND T = t + {size} - 1"
    # 1M: the calendar month. least() keeps the date functions in range for any t; the bound refuses the rest.
    day = f"toDateTime(intDiv(least(t, {MONTH_CHECK_LIMIT_MS - 1}), 1000), 'UTC')"
    start = f"toInt128(toUnixTimestamp(toDateTime(toStartOfMonth({day}), 'UTC'))) * 1000"
    end = f"toInt128(toUnixTimestamp(toDateTime(addMonths(toStartOfMonth({day}), 1), 'UTC'))) * 1000 - 1"
    month = f"t < {MONTH_CHECK_LIMIT_MS} AND t = {start} AND T = {end}"
    # Every interval the pattern admits is fixed-size or 1M, so a size of 0 is only ever 1M's.
    return f"if({size} = 0, {month}, {fixed})"


def contract_check(rule: RowRule) -> str:
    """The SQL condition that holds exactly when the validating path accepts the record (see the module)."""
    checks = [
        f"match(value, {sql_string(CANONICAL_PATTERN)})",
        *[f"{name} <= {MAX_ID}" for name in ("t", "T", "f", "L", "n")],
        _span_check(),
        "l > 0 AND l <= o AND o <= h AND l <= c AND c <= h AND V <= v AND Q <= q",
    ]
    if rule.closed_only:
        checks.append(f"{_field('x')} = 'true'")
    if rule.version_from_seq:
        checks.append(f"{_field('seq')} != ''")
    return " AND ".join(f"({check})" for check in checks)


def insert_statement(database: str, table: str, rule: RowRule) -> str:
    """``INSERT INTO database.table ... SELECT ... FROM {source}`` of :data:`VALUES_STRUCTURE` lines, every row
    under the batch token ``{token}`` (both filled in by
    :func:`~services.shared.clickhouse.insert_select_text`); refused whole unless every record passes
    :func:`contract_check`."""
    decimal = {name: f"toDecimal128OrZero({_field(name)}, 18)" for name in ("o", "h", "l", "c", "v", "q", "V", "Q")}
    integer = {name: f"toInt128OrZero({_field(name)})" for name in ("t", "T", "f", "L", "n")}
    version = _field("seq") if rule.version_from_seq else _field("version")
    outputs = {
        "symbol": _field("s"),
        "interval": _field("i"),
        "open_time": "toInt64(t)",
        "close_time": "toInt64(T)",
        "first_trade_id": "toInt64(f)",
        "last_trade_id": "toInt64(L)",
        "open": "o",
        "high": "h",
        "low": "l",
        "close": "c",
        "volume": "v",
        "quote_volume": "q",
        "trade_count": "toUInt64(n)",
        "taker_buy_volume": "V",
        "taker_buy_quote_volume": "Q",
        "version": f"toUInt64OrZero({version})",
        "source": _field("source"),
        "kafka_partition": "kafka_partition",
        "kafka_offset": "kafka_offset",
        "batch_token": "{token}",
    }
    assert tuple(outputs) == KLINE_COLUMNS
    # A value's fields, split at the commas (a value of the canonical shape has no other comma), each the text
    # after its first colon without the quotes. Conversions are the ...OrZero kind: a value that is not of the
    # shape cannot fail one of them with an error of its own before the check refuses it.
    fields = (
        "arrayMap(x -> trim(BOTH '\"' FROM substring(x, position(x, ':') + 1)), "
        "splitByChar(',', substring(value, 2, length(value) - 2)))"
    )
    named = ", ".join(f"{expr} AS {name}" for name, expr in {"i": _field("i"), **integer, **decimal}.items())
    return (
        f"INSERT INTO {database}.{table} ({', '.join(KLINE_COLUMNS)}) "
        f"SELECT {', '.join(outputs.values())} "
        f"FROM (SELECT kafka_partition, kafka_offset, value, {fields} AS a, {named} FROM {{source}}) "
        f"WHERE throwIf(NOT ({contract_check(rule)}), {sql_string(_REJECTION)}) = 0"
    )


_REJECTION = f"{REJECTED_MARKER} (the writer validates this batch record by record)"

# For the finalized writer's metrics, read from a batch ClickHouse accepted (so every line is canonical).
_CLOSE = re.compile(rb'"T":([0-9]+),"s":"[A-Z0-9_]+","i":"([0-9]+[smhdwM])"')
_VERSION_ZERO = b',"version":0,"source":'


def closes_of(body: bytes) -> Counter[tuple[str, int]]:
    """How many rows of an accepted batch close at each (interval, close time)."""
    counts: Counter[tuple[bytes, bytes]] = Counter(_CLOSE.findall(body))
    return Counter({(interval.decode(), int(close)): n for (close, interval), n in counts.items()})


def corrections_of(body: bytes, rows: int) -> int:
    """Rows of an accepted batch whose kline ``version`` is above 0 (a correction)."""
    return rows - body.count(_VERSION_ZERO)
