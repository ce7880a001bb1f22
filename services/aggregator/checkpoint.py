"""The aggregator's checkpoint topic: its record format, and reading one partition's latest checkpoint back.

The topic (``<group>-checkpoint``, compacted, as many partitions as ``trades``) holds, for trades partition
``p``, in its partition ``p``:

* one **symbol record** per symbol (key = the symbol): the symbol's :meth:`KlineBook.export_state
  <services.core.book.KlineBook.export_state>`, the trades offset its state is current through
  (``next_offset``: every record of this symbol below it is applied, none at or above), and the finalized
  klines it closed whose delivery was not confirmed yet (``unconfirmed``; re-sent after a restore). A symbol
  removed from the feed keeps its record as a tombstone: ``"book": null``, with its ``next_offset`` (its old
  records stay skipped) and its unconfirmed klines (the ones its removal closed), and a restore creates no book
  for it (the symbol lifecycle on :mod:`services.aggregator.engine`);
* one **marker** (key ``@marker``): the partition's ``next_offset`` — written only after every symbol record
  of that checkpoint was acknowledged by the broker, so when a marker says ``N`` every symbol with a record
  below ``N`` has its state on the topic — and ``seq_limit``, the snapshot sequence numbers this partition may
  use (a lease: sequence numbers below it may have been used, so a restore continues above it).

Values are JSON a person can read with ``kcat``. Compaction keeps the newest record per key, which is all a
restore needs. The protocol that writes and reads these records is on :mod:`services.aggregator.engine`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.core.models import InvalidInput, Kline
from services.shared.settings import KafkaSettings

FORMAT: Final = 1
MARKER_KEY: Final = b"@marker"


class CheckpointError(Exception):
    """A checkpoint record that cannot be used; the message names the topic, partition and key."""


@dataclass(frozen=True, slots=True)
class SymbolCheckpoint:
    symbol: str
    next_offset: int
    #: None: the symbol was removed (a tombstone; no book to restore).
    book: dict[str, Any] | None
    unconfirmed: list[Kline]


@dataclass(slots=True)
class PartitionCheckpoint:
    """The newest checkpoint of one trades partition (empty when the partition was never checkpointed)."""

    partition: int
    next_offset: int | None = None
    seq_limit: int = 0
    symbols: dict[str, SymbolCheckpoint] = field(default_factory=dict)
    records_read: int = 0


def _dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def encode_symbol(symbol: str, next_offset: int, book: Mapping[str, Any] | None, unconfirmed: Iterable[Kline]) -> bytes:
    return _dumps(
        {
            "kind": "symbol",
            "format": FORMAT,
            "symbol": symbol,
            "next_offset": next_offset,
            "book": book,
            "unconfirmed": [kline.to_dict() for kline in unconfirmed],
        }
    )


def encode_marker(partition: int, next_offset: int | None, seq_limit: int, symbols: int) -> bytes:
    return _dumps(
        {
            "kind": "marker",
            "format": FORMAT,
            "partition": partition,
            "next_offset": next_offset,
            "seq_limit": seq_limit,
            "symbols": symbols,
        }
    )


def decode_partition(topic: str, partition: int, latest: Mapping[bytes | None, bytes | None]) -> PartitionCheckpoint:
    """The checkpoint from the newest value of every key; raises :class:`CheckpointError` on a bad record."""
    checkpoint = PartitionCheckpoint(partition, records_read=len(latest))
    for key, value in latest.items():
        where = f"checkpoint {topic}[{partition}] key {key!r}"
        if value is None:
            continue  # a tombstone: the key was deleted
        try:
            obj = json.loads(value)
            if not isinstance(obj, dict) or obj.get("format") != FORMAT:
                raise CheckpointError(f"{where}: not a format-{FORMAT} checkpoint record")
            if key == MARKER_KEY:
                offset = obj["next_offset"]
                checkpoint.next_offset = None if offset is None else int(offset)
                checkpoint.seq_limit = int(obj["seq_limit"])
            else:
                symbol = str(obj["symbol"])
                if key is None or key.decode() != symbol:
                    raise CheckpointError(f"{where}: record of symbol {symbol!r} under another key")
                book = obj["book"]
                if book is not None and not isinstance(book, dict):
                    raise CheckpointError(f"{where}: 'book' is neither an object nor null")
                checkpoint.symbols[symbol] = SymbolCheckpoint(
                    symbol,
                    int(obj["next_offset"]),
                    book,
                    [Kline.from_dict(item) for item in obj["unconfirmed"]],
                )
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError, InvalidInput) as exc:
            raise CheckpointError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None
    return checkpoint


class CheckpointReader:
    """Reads checkpoint partitions from their start to their end offset (no consumer group)."""

    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        self.topic = topic
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap,
            client_id=f"{settings.client_id}-aggregator-checkpoint-reader",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            request_timeout_ms=settings.request_timeout_ms,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def read(self, partitions: Iterable[int], timeout_s: float) -> dict[int, PartitionCheckpoint]:
        """Each partition's newest checkpoint; raises TimeoutError after ``timeout_s``."""
        wanted = sorted(set(partitions))
        if not wanted:
            return {}
        deadline = time.monotonic() + timeout_s
        tps = [TopicPartition(self.topic, p) for p in wanted]
        consumer = self._consumer
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends: dict[TopicPartition, int] = dict(await consumer.end_offsets(tps))
        latest: dict[int, dict[bytes | None, bytes | None]] = {p: {} for p in wanted}
        remaining = set(tps)
        while remaining:
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
            if not remaining:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"reading checkpoint {self.topic} {sorted(tp.partition for tp in remaining)}")
            fetched = await consumer.getmany(*remaining, timeout_ms=int(min(left, 0.5) * 1000), max_records=20_000)
            for tp, records in fetched.items():
                target = latest[tp.partition]
                for record in records:
                    if record.offset < ends[tp]:
                        target[record.key] = record.value
            await asyncio.sleep(0)
        consumer.assign([])
        return {p: decode_partition(self.topic, p, latest[p]) for p in wanted}
