"""``snapshot_writer``: in-progress klines from ``klines.snapshots`` into the ``klines_snapshots`` table.

The seed's ``snapshot_writer_task``: the aggregator's clock publishes every in-progress kline that changed;
this writer persists them in batches (``persistence.snapshot_buffer_size`` / ``snapshot_flush_interval_ms``).
A row's version is the snapshot's ``seq`` (increasing per key), so under ``FINAL`` each kline shows its latest
snapshot. The topic is compacted: a tombstone (null value) is skipped, not dead-lettered. The engine and its
protocol live in :mod:`services.shared.writer`.

Run it alone with ``python -m services.snapshot_writer``, or with the finalized writer in one process with
``python -m services.writers``.
"""

from __future__ import annotations

from services.core.models import InvalidInput, Kline
from services.shared.messages import KlineWire
from services.shared.settings import Settings
from services.shared.writer import WriterSpec

COMPONENT = "snapshot_writer"


def snapshot_version(kline: Kline | KlineWire, seq: int | None) -> int:
    """The row version of a snapshot: its ``seq``, without which it cannot be ordered against the others."""
    if seq is None:
        raise InvalidInput("snapshot without 'seq' (the per-key snapshot sequence that versions its row)")
    return seq


def snapshot_spec(settings: Settings) -> WriterSpec:
    """The snapshot writer's topic, table, consumer group and flush policy from ``settings``."""
    return WriterSpec(
        name="snapshot",
        component=COMPONENT,
        topic=settings.kafka.topics.snapshots,
        table=settings.clickhouse.snapshots_table,
        group_id=f"{settings.kafka.client_id}-{COMPONENT}",
        buffer_size=settings.persistence.snapshot_buffer_size,
        flush_interval_ms=settings.persistence.snapshot_flush_interval_ms,
        version_of=snapshot_version,
        skip_tombstones=True,
    )
