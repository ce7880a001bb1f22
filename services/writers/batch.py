"""A batch and its deduplication token: what a writer consumed since its last flush, pure data, no I/O.

A batch holds the records of one flush in one of two forms. As fetched (:meth:`Batch.add_values`): each record
becomes a ``TabSeparated`` line of partition, offset and value that ClickHouse parses and checks
(:mod:`services.writers.contract`), with no Python per record beyond that line. Or validated
(:meth:`Batch.add_run`): rows with their verified text and dead letters with their reasons, which is what the
validating path makes, at once or after ClickHouse refused the fetched form (:meth:`Batch.validated`).

Either way it keeps every partition's offset range and a checksum of what it consumed, from which
:meth:`Batch.token` derives the insert's deduplication token, so a retried insert of the same batch, in either
form, carries the same token.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from decimal import Context, Decimal

from services.core.models import InvalidInput, Kline
from services.shared.clickhouse import Decimals, KlineEntry, KlineRows, kline_decimals, kline_text
from services.shared.messages import DecodedKline
from services.writers.contract import KlineValues, RowRule
from services.writers.ports import ConsumerRecordLike, DeadLetter

#: ``Decimal(38, 18)``: 18 fractional digits, 20 integer digits. A value outside would be truncated or refused
#: by ClickHouse, so it is rejected (dead-lettered) before it can stall the batch it is in.
_MAX_SCALE = 18
_MAX_INTEGER_DIGITS = 20
_SCALE = Decimal(1).scaleb(-_MAX_SCALE)
_EXACT = Context(prec=2 * (_MAX_SCALE + _MAX_INTEGER_DIGITS))
UINT64_LIMIT = 2**64
_DECIMAL_FIELDS = ("o", "h", "l", "c", "v", "q", "V", "Q")


def check_fits_table(kline: Kline, version: int) -> Decimals:
    """Raise :class:`InvalidInput` unless every value fits its column exactly (Decimal(38, 18), UInt64); return
    the decimals' exact text for the insert."""
    for name in _DECIMAL_FIELDS:
        value: Decimal = getattr(kline, name)
        if not _fits_decimal_38_18(value):
            raise InvalidInput(f"field {name!r} = {value} does not fit Decimal(38, 18) exactly", "field")
    check_version(version)
    return kline_decimals(kline)


def row_text(record: DecodedKline, version: int) -> str:
    """The start of the record's row (:func:`~services.shared.clickhouse.kline_text`), once every value is
    known to fit its column: the fast decoder verified its text already, leaving only the version to check."""
    if record.text is None:
        return kline_text(record.kline, check_fits_table(record.kline, version))
    check_version(version)
    return record.text


def check_version(version: int) -> None:
    """Raise :class:`InvalidInput` unless ``version`` fits the ``UInt64`` version column."""
    if not 0 <= version < UINT64_LIMIT:
        raise InvalidInput(f"version {version} does not fit UInt64", "field")


def _fits_decimal_38_18(value: Decimal) -> bool:
    # Fast path on the plain text (what a decoded kline's decimals are): a few times cheaper than as_tuple(),
    # and this runs eight times per row.
    text = str(value)
    if "E" not in text and text[0].isdigit():
        dot = text.find(".")
        integer_digits, fraction_digits = (len(text), 0) if dot < 0 else (dot, len(text) - dot - 1)
        if integer_digits <= _MAX_INTEGER_DIGITS and fraction_digits <= _MAX_SCALE:
            return True
    # Exponent notation, a sign, or more digits than the column has: decide exactly. Extra fractional digits
    # are fine when they are zeros (1.50000000000000000000).
    if not value.is_finite() or value < 0 or value.adjusted() >= _MAX_INTEGER_DIGITS:
        return False
    return value.quantize(_SCALE, context=_EXACT) == value


class Batch:
    """What was consumed since the last flush: rows to insert, dead letters to deliver, offsets to commit.

    A partition's offset range covers every record consumed from it (rows, dead letters, skipped tombstones),
    so committing ``last + 1`` after the flush moves past all of them.
    """

    __slots__ = ("_consumed", "_crc", "_line_counts", "_lines", "_runs", "dead", "entries", "opened_at", "ranges")

    def __init__(self) -> None:
        self.entries: list[KlineEntry] = []  # (partition, offset, kline, version, row text)
        self.dead: list[DeadLetter] = []
        self.ranges: dict[int, tuple[int, int]] = {}  # partition -> (first offset, last offset)
        self._crc: dict[int, int] = {}  # partition -> running CRC-32 of what was consumed
        self._consumed: dict[int, int] = {}  # partition -> records consumed
        # The fetched form: per partition, the fetched runs (kept for the validating path) and their lines.
        self._runs: dict[int, list[Sequence[ConsumerRecordLike]]] = {}
        self._lines: dict[int, list[bytes]] = {}
        self._line_counts: dict[int, int] = {}
        self.opened_at: float | None = None

    def __len__(self) -> int:
        return self.consumed

    @property
    def consumed(self) -> int:
        return sum(self._consumed.values())

    @property
    def value_rows(self) -> int:
        """Lines of the fetched form (records not validated yet, tombstones skipped)."""
        return sum(self._line_counts.values())

    def _track(self, partition: int, first: int, last: int, consumed: bytes, count: int, now: float) -> None:
        first_last = self.ranges.get(partition)
        self.ranges[partition] = (first, last) if first_last is None else (first_last[0], last)
        self._crc[partition] = zlib.crc32(consumed, self._crc.get(partition, 0))
        self._consumed[partition] = self._consumed.get(partition, 0) + count
        if self.opened_at is None:
            self.opened_at = now

    def add_row(
        self,
        partition: int,
        offset: int,
        value: bytes | None,
        kline: Kline,
        version: int,
        now: float,
        text: str | None = None,
    ) -> None:
        self._track(partition, offset, offset, value or b"", 1, now)
        self.entries.append((partition, offset, kline, version, text if text is not None else kline_text(kline)))

    def add_dead(self, letter: DeadLetter, value: bytes | None, now: float) -> None:
        self._track(letter.partition, letter.offset, letter.offset, value or b"", 1, now)
        self.dead.append(letter)

    def add_skipped(self, partition: int, offset: int, now: float) -> None:
        self._track(partition, offset, offset, b"", 1, now)

    def add_run(
        self,
        partition: int,
        records: Sequence[ConsumerRecordLike],
        entries: Iterable[KlineEntry],
        dead: Iterable[DeadLetter],
        now: float,
    ) -> None:
        """Add consecutive ``records`` of one partition at once (one ``getmany`` list): the rows and dead letters
        made of them, and the offsets and values they cover, skipped tombstones included. The same as adding
        them one by one (the CRC of concatenated values is the running CRC), in a few calls instead of many."""
        if not records:
            return
        values = b"".join([r.value or b"" for r in records])
        self._track(partition, records[0].offset, records[-1].offset, values, len(records), now)
        self.entries.extend(entries)
        self.dead.extend(dead)

    def add_values(
        self, partition: int, records: Sequence[ConsumerRecordLike], now: float, *, skip_tombstones: bool
    ) -> int:
        """Add consecutive ``records`` of one partition as fetched: one line each (partition, offset, value) for
        ClickHouse to parse, a tombstone skipped when ``skip_tombstones`` (the count is returned). The checksum
        covers the lines, which hold every offset and value."""
        if not records:
            return 0
        kept = [r for r in records if r.value is not None] if skip_tombstones else records
        lines = b"".join([b"%d\t%d\t%b\n" % (partition, r.offset, r.value or b"") for r in kept])
        self._track(partition, records[0].offset, records[-1].offset, lines, len(records), now)
        self._runs.setdefault(partition, []).append(records)
        self._lines.setdefault(partition, []).append(lines)
        self._line_counts[partition] = self._line_counts.get(partition, 0) + len(kept)
        return len(records) - len(kept)

    @property
    def has_values(self) -> bool:
        """Records in the fetched form, not validated yet."""
        return bool(self._runs)

    def values(self, rule: RowRule) -> KlineValues:
        """The fetched form for ClickHouse, partitions in order."""
        body = b"".join(line for p in sorted(self._lines) for line in self._lines[p])
        return KlineValues(body, self.value_rows, rule)

    def fetched_runs(self) -> list[tuple[int, Sequence[ConsumerRecordLike]]]:
        """The fetched runs, partitions in order, for the validating path."""
        return [(p, run) for p in sorted(self._runs) for run in self._runs[p]]

    def validated(self, entries: Iterable[KlineEntry], dead: Iterable[DeadLetter]) -> None:
        """Replace the fetched form by what the validating path made of it (offsets and checksum unchanged, so
        the token is too)."""
        self.entries.extend(entries)
        self.dead.extend(dead)
        self._runs.clear()
        self._lines.clear()
        self._line_counts.clear()

    def due(self, now: float, buffer_size: int, flush_interval_s: float) -> bool:
        """Flush when ``buffer_size`` records are buffered or ``flush_interval_s`` passed since the first."""
        if self.consumed >= buffer_size:
            return True
        return self.opened_at is not None and now - self.opened_at >= flush_interval_s

    def token(self, prefix: str) -> str:
        """The batch's ``insert_deduplication_token``, e.g. ``finalized:p0=100-199,p2=40-80#1c291ca3``.

        Offset ranges identify the batch: re-reading the same offsets after a retry gives the same token, so
        ClickHouse drops the repeat. The checksum of what was consumed is there so that a topic deleted and
        re-created (offsets restarting at 0) can never have a new batch silently dropped as a "repeat" of an
        old one.
        """
        parts = ",".join(f"p{p}={first}-{last}" for p, (first, last) in sorted(self.ranges.items()))
        digest = 0
        for partition in sorted(self._crc):
            digest = zlib.crc32(f"{partition}:{self._crc[partition]};".encode(), digest)
        return f"{prefix}:{parts}#{digest:08x}"

    def rows(self, token: str) -> KlineRows:
        """The validated rows in :data:`~services.shared.clickhouse.KLINE_COLUMNS` order, with provenance."""
        return KlineRows(self.entries, token)

    def next_offsets(self) -> dict[int, int]:
        """``{partition: last offset + 1}``: what to commit once the batch is stored."""
        return {p: last + 1 for p, (_first, last) in self.ranges.items()}

    def drop_partitions(self, partitions: Iterable[int]) -> int:
        """Forget what was consumed from revoked ``partitions`` (the new owner re-reads it); return the count."""
        gone = set(partitions) & set(self.ranges)
        if not gone:
            return 0
        before = self.consumed
        self.entries = [e for e in self.entries if e[0] not in gone]
        self.dead = [d for d in self.dead if d.partition not in gone]
        for p in gone:
            del self.ranges[p]
            del self._crc[p]
            del self._consumed[p]
            self._runs.pop(p, None)
            self._lines.pop(p, None)
            self._line_counts.pop(p, None)
        if not self.ranges:
            self.opened_at = None
        return before - self.consumed
