"""What the aggregator keeps per ``trades`` partition, and its counters (shared by the engine and checkpointer).

The fields of :class:`PartitionState` are the bookkeeping of the recovery protocol on
:mod:`services.aggregator.engine`: ``next_offsets`` (step 2), ``unconfirmed`` (step 3), ``dirty``, ``flight``,
``checkpointed`` and ``committed`` (steps 4-6), ``restored_from`` (step 7).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from services.core.book import KlineBooks
from services.core.models import Kline

#: Identity of a finalized kline in a symbol's unconfirmed set: (interval, open time, version).
KlineIdent = tuple[str, int, int]


class Phase(enum.Enum):
    RESTORING = "restoring"
    READY = "ready"
    REVOKED = "revoked"


@dataclass(eq=False)
class PartitionState:
    """One trades partition's books and the bookkeeping of the recovery protocol."""

    tp: TopicPartition
    books: KlineBooks
    phase: Phase = Phase.RESTORING
    restored: asyncio.Event = field(default_factory=asyncio.Event)
    next_offsets: dict[str, int] = field(default_factory=dict)
    position: int | None = None
    restored_from: int | None = None
    dirty: set[str] = field(default_factory=set)
    unconfirmed: dict[str, dict[KlineIdent, Kline]] = field(default_factory=dict)
    snapshot_backlog: dict[tuple[str, str, int], Kline] = field(default_factory=dict)
    seq: int = 0
    seq_limit: int = 0
    flight: asyncio.Task[bool] | None = None
    checkpointed: int | None = None
    committed: int | None = None
    guard_checked: bool = False
    #: False once this worker no longer owns the partition (revoked and not given back): its output is dropped.
    owned: bool = True

    @property
    def partition(self) -> int:
        return int(self.tp.partition)

    def read_position(self) -> int:
        if self.position is not None:
            return self.position
        return self.restored_from if self.restored_from is not None else 0

    def resume_offset(self) -> int | None:
        """Where reading may resume without a gap: after the last applied record, else the restored marker.

        ``None`` means "from the start of the log" (no marker: nothing of this partition was ever committed).
        """
        return self.position if self.position is not None else self.restored_from


@dataclass
class Stats:
    """Counters of the hot path (plain ints: the hot path must not pay for a metrics library)."""

    records: int = 0
    batches: int = 0
    trades_applied: int = 0
    records_replayed: int = 0
    gaps: int = 0
    #: Symbol records applied: removals that ended a book, additions.
    symbols_removed: int = 0
    symbols_added: int = 0
    dead_letters: int = 0
    dead_letters_dropped: int = 0
    klines_finalized: int = 0
    finalized_confirmed: int = 0
    finalized_resent: int = 0
    data_loss: int = 0
    snapshots_sent: int = 0
    snapshots_deferred: int = 0
    snapshots_failed: int = 0
    checkpoints: int = 0
    checkpoint_failures: int = 0
    checkpoints_deferred: int = 0
    #: Checkpoints not started yet because encoding them would take more than its share of the time.
    checkpoints_spaced: int = 0
    commits: int = 0
    restores: int = 0
    restored_symbols: int = 0
    reused_partitions: int = 0
    resent_finalized: int = 0
    ticks: int = 0
    offset_guard_errors: int = 0
    stale_batches: int = 0
    flow_pauses: int = 0
    flow_paused_s: float = 0.0
    longest_apply_s: float = 0.0
