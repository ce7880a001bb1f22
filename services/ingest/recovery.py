"""Where did we stop? Each symbol's last published ``a``, read back from the tail of the ``trades`` topic.

A symbol lives in one partition (key = symbol, the producer's default murmur2 partitioner), and its records
there are in increasing ``a`` (ingest publishes them so). So its last ``a`` is in its last record in that
partition: the last trade of a batch, the ``to_a`` of a gap, the ``a`` of a hand-injected aggTrade, or the
``last_a`` of a lifecycle record (a symbol removed and wanted again after a restart continues after it; a
record without ``last_a`` says nothing, and the scan goes on to the records before it).

Per partition, the scan reads backwards in chunks of ``chunk`` records from the end offset until every wanted
symbol of that partition was seen, the beginning is reached, or ``max_records`` were read. A wanted symbol not
found starts fresh from the live stream (logged). Values are decoded only as far as needed (the last ``a``);
records that are not ingest's (unreadable, other shapes) are skipped and counted.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2

from services.shared.kafka import make_consumer, partitions_of
from services.shared.settings import KafkaSettings

log = logging.getLogger("services.ingest.recovery")


class RecoveryFailed(Exception):
    """The topic's tail could not be read; the message says which partition and why."""


@dataclass(slots=True)
class Recovery:
    last: dict[str, int] = field(default_factory=dict)
    records_read: int = 0
    unreadable: int = 0
    not_found: set[str] = field(default_factory=set)


def partition_for(symbol: str, partitions: int) -> int:
    """The partition aiokafka's default partitioner picks for key ``symbol``."""
    hashed: int = murmur2(symbol.encode())
    return (hashed & 0x7FFFFFFF) % partitions


_BATCH_PREFIX = b'{"type":"trades","s":"'
_LAST_TRADE = re.compile(
    rb'\{"a":([0-9]{1,19}),"p":"[^"]*","q":"[^"]*","f":[0-9]+,"l":[0-9]+,"T":[0-9]+,"m":(?:true|false)\}\]\}$'
)
_SYMBOL = re.compile(rb"[A-Z0-9]{1,40}")


def last_id_of(value: bytes | None) -> tuple[str, int] | None:
    """``(symbol, last a)`` of one ``trades`` record, or None when it is not a record ingest understands."""
    if value is None:
        return None
    if value.startswith(_BATCH_PREFIX):
        # Ingest's own batch layout (messages.encode_trade_batch): read the symbol and the last trade's id
        # without decoding the whole record, which can hold a thousand trades.
        end = value.find(b'"', len(_BATCH_PREFIX))
        name = value[len(_BATCH_PREFIX) : end]
        start = value.rfind(b'{"a":')
        match = _LAST_TRADE.match(value, start) if start > 0 and end > 0 else None
        if match is not None and _SYMBOL.fullmatch(name):
            return name.decode(), int(match.group(1))
    try:
        obj = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    symbol = obj.get("s")
    if not isinstance(symbol, str) or not symbol.isalnum():
        return None
    kind = obj.get("type")
    last: object = None
    if kind == "trades":
        trades = obj.get("trades")
        if isinstance(trades, list) and trades and isinstance(trades[-1], dict):
            last = trades[-1].get("a")
    elif kind == "gap":
        last = obj.get("to_a")
    elif kind == "symbol":
        last = obj.get("last_a")
    elif obj.get("e") == "aggTrade":
        last = obj.get("a")
    if type(last) is not int or last < 0:
        return None
    return symbol.upper(), last


async def recover_last_ids(
    settings: KafkaSettings,
    wanted: Iterable[str],
    *,
    max_records: int = 200_000,
    chunk: int = 20_000,
) -> Recovery:
    """Scan the tail of ``settings.topics.trades`` for the last ``a`` of each wanted symbol (see the module)."""
    topic = settings.topics.trades
    consumer = make_consumer(
        settings, group_id=None, client_suffix="ingest-recovery", isolation_level="read_uncommitted"
    )
    result = Recovery()
    await consumer.start()
    try:
        partitions = await partitions_of(consumer, topic)
        if not partitions:
            raise RecoveryFailed(f"topic {topic!r} has no partitions (does it exist? `klines topics create`)")
        count = len(partitions)
        wanted_set = set(wanted)
        by_partition: dict[int, set[str]] = {}
        for symbol in wanted_set:
            by_partition.setdefault(partition_for(symbol, count), set()).add(symbol)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            pending = set(by_partition.get(tp.partition, ()))
            if not pending:
                continue
            floor = max(begins[tp], ends[tp] - max_records)
            hi = ends[tp]
            while pending and hi > floor:
                lo = max(floor, hi - chunk)
                found = await _read_range(consumer, tp, lo, hi, result)
                for symbol, last in found.items():
                    # Only the wanted ones: a partition also holds other symbols (another shard's, removed ones).
                    if symbol in wanted_set and symbol not in result.last:
                        result.last[symbol] = last
                pending -= found.keys()
                hi = lo
            result.not_found |= pending
    finally:
        await consumer.stop()
    return result


async def _read_range(
    consumer: AIOKafkaConsumer, tp: TopicPartition, lo: int, hi: int, result: Recovery
) -> dict[str, int]:
    """The last ``a`` per symbol among offsets ``lo..hi-1`` of ``tp``."""
    consumer.assign([tp])
    consumer.seek(tp, lo)
    found: dict[str, int] = {}
    position = lo
    idle = 0
    while position < hi:
        batch = await consumer.getmany(tp, timeout_ms=1000, max_records=5000)
        records = batch.get(tp, [])
        if not records:
            if await consumer.position(tp) >= hi:
                break  # offsets without records (transaction markers): nothing more to read
            idle += 1
            if idle >= 10:
                raise RecoveryFailed(f"{tp.topic}[{tp.partition}]: no records between offsets {position} and {hi}")
            continue
        idle = 0
        for record in records:
            if record.offset >= hi:
                position = hi
                break
            position = record.offset + 1
            result.records_read += 1
            parsed = last_id_of(record.value)
            if parsed is None:
                result.unreadable += 1
                continue
            symbol, last = parsed
            found[symbol] = last
    return found
