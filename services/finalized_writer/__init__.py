"""``finalized_writer``: closed klines from ``klines.finalized`` into the ``klines_finalized`` table.

The seed's high-priority ``finalized_writer_task``: buffer up to ``persistence.finalized_buffer_size`` klines
or ``persistence.finalized_flush_interval_ms``, insert through the shared write path, then commit. A row's
version is the kline's own ``version`` (a correction after a gap repair counts up and replaces the old row
under ``FINAL``). The engine and its protocol live in :mod:`services.shared.writer`; this package only says
what is particular.

Run it alone with ``python -m services.finalized_writer`` (for a ClickHouse server), or together with the
snapshot writer in one process with ``python -m services.writers`` (embedded chDB).
"""

from __future__ import annotations

from services.core.models import InvalidInput, Kline
from services.shared.messages import KlineWire
from services.shared.settings import Settings
from services.shared.writer import WriterSpec

COMPONENT = "finalized_writer"


def finalized_version(kline: Kline | KlineWire, seq: int | None) -> int:
    """The row version of a finalized kline: its own ``version``; an open kline does not belong here."""
    if not kline.x:
        raise InvalidInput("kline is not closed (x=false) on the finalized topic")
    return kline.version


def finalized_spec(settings: Settings) -> WriterSpec:
    """The finalized writer's topic, table, consumer group and flush policy from ``settings``."""
    return WriterSpec(
        name="finalized",
        component=COMPONENT,
        topic=settings.kafka.topics.finalized,
        table=settings.clickhouse.finalized_table,
        group_id=f"{settings.kafka.client_id}-{COMPONENT}",
        buffer_size=settings.persistence.finalized_buffer_size,
        flush_interval_ms=settings.persistence.finalized_flush_interval_ms,
        version_of=finalized_version,
        closed_klines=True,
    )
