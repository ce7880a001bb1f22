"""What tells the two writers apart: topic, table, consumer group, flush policy, and how a row is versioned.

* ``finalized_writer`` (the seed's high-priority ``finalized_writer_task``): closed klines from
  ``klines.finalized`` into ``klines_finalized``, buffered up to ``persistence.finalized_buffer_size`` or
  ``persistence.finalized_flush_interval_ms``. A row's version is the kline's own ``version``: a correction after a
  gap repair counts up and replaces the old row under ``FINAL``. An open kline does not belong there.
* ``snapshot_writer`` (the seed's ``snapshot_writer_task``): in-progress klines from ``klines.snapshots`` into
  ``klines_snapshots`` (``persistence.snapshot_buffer_size`` / ``snapshot_flush_interval_ms``). A row's version is
  the snapshot's ``seq`` (increasing per key), so under ``FINAL`` each kline shows its latest snapshot. The topic is
  compacted: a tombstone (null value) is skipped, not dead-lettered.

Each rule exists twice, once per path, next to each other: ``version_of`` in Python for the validating path, and
its :class:`~services.writers.contract.RowRule` for ClickHouse (``tests/integration/test_clickhouse_insert.py``
holds them together).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.core.models import InvalidInput, Kline
from services.shared.messages import KlineWire
from services.shared.settings import Settings
from services.writers.contract import RowRule

FINALIZED_COMPONENT = "finalized_writer"
SNAPSHOT_COMPONENT = "snapshot_writer"

FINALIZED_RULE = RowRule(closed_only=True, version_from_seq=False)
SNAPSHOT_RULE = RowRule(closed_only=False, version_from_seq=True)
#: The rule of a ``version_of`` that takes every kline and versions it by its own ``version``.
KLINE_VERSION_RULE = RowRule(closed_only=False, version_from_seq=False)


@dataclass(frozen=True, slots=True)
class WriterSpec:
    """What tells the two writers apart; everything else is the shared engine.

    ``version_of(kline, seq)`` returns the row's ReplacingMergeTree version or raises
    :class:`~services.core.models.InvalidInput` (the record is then dead-lettered with that reason); ``rule`` says
    the same to ClickHouse.
    """

    name: str
    component: str
    topic: str
    table: str
    group_id: str
    buffer_size: int
    flush_interval_ms: int
    version_of: Callable[[Kline | KlineWire, int | None], int]
    skip_tombstones: bool = False
    #: Rows are closed klines: observe each one's close -> stored latency and count corrections (version > 0).
    closed_klines: bool = False
    rule: RowRule = KLINE_VERSION_RULE

    def __post_init__(self) -> None:
        if self.buffer_size < 1 or self.flush_interval_ms < 1:
            raise ValueError(f"{self.component}: buffer_size and flush_interval_ms must be positive")


def finalized_version(kline: Kline | KlineWire, seq: int | None) -> int:
    """The row version of a finalized kline: its own ``version``; an open kline does not belong here."""
    if not kline.x:
        raise InvalidInput("kline is not closed (x=false) on the finalized topic", "topic")
    return kline.version


def snapshot_version(kline: Kline | KlineWire, seq: int | None) -> int:
    """The row version of a snapshot: its ``seq``, without which it cannot be ordered against the others."""
    if seq is None:
        raise InvalidInput("snapshot without 'seq' (the per-key snapshot sequence that versions its row)", "topic")
    return seq


def finalized_spec(settings: Settings) -> WriterSpec:
    """The finalized writer's topic, table, consumer group and flush policy from ``settings``."""
    return WriterSpec(
        name="finalized",
        component=FINALIZED_COMPONENT,
        topic=settings.kafka.topics.finalized,
        table=settings.clickhouse.finalized_table,
        group_id=f"{settings.kafka.client_id}-{FINALIZED_COMPONENT}",
        buffer_size=settings.persistence.finalized_buffer_size,
        flush_interval_ms=settings.persistence.finalized_flush_interval_ms,
        version_of=finalized_version,
        closed_klines=True,
        rule=FINALIZED_RULE,
    )


def snapshot_spec(settings: Settings) -> WriterSpec:
    """The snapshot writer's topic, table, consumer group and flush policy from ``settings``."""
    return WriterSpec(
        name="snapshot",
        component=SNAPSHOT_COMPONENT,
        topic=settings.kafka.topics.snapshots,
        table=settings.clickhouse.snapshots_table,
        group_id=f"{settings.kafka.client_id}-{SNAPSHOT_COMPONENT}",
        buffer_size=settings.persistence.snapshot_buffer_size,
        flush_interval_ms=settings.persistence.snapshot_flush_interval_ms,
        version_of=snapshot_version,
        skip_tombstones=True,
        rule=SNAPSHOT_RULE,
    )
