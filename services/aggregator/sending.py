"""``try_send``: hand a record to an aiokafka producer without ever waiting (the seed's ``try_send``).

``AIOKafkaProducer.send()`` is a coroutine that returns the delivery future once the record sits in the
producer's buffer. It suspends in exactly two cases: the topic's metadata is not known yet, or the partition's
open batch (``max_batch_size`` bytes; aiokafka keeps one open batch per partition and no other buffer) is full
and it would wait up to ``request_timeout_ms`` for the sender to drain it, then raise ``KafkaTimeoutError``.

:func:`try_send` steps that coroutine once. If it finishes, the record is buffered and its delivery future is
returned, never awaited here. If it would suspend, the coroutine is closed instead — the record is *not*
enqueued (aiokafka documents that cancelling ``send()`` itself stops the record) — and :class:`NotEnqueued`
says why. So the caller decides what a full buffer means (for a finalized kline: one DATA_LOSS log and a
counter, no retry queue), and the compute loop never blocks on the broker.

Warm the metadata (:func:`warm_metadata`) before the first send, so "unknown metadata" does not look like a
full buffer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer


class NotEnqueued(Exception):
    """The record was not handed to the producer; ``reason`` says why (buffer full, closed, too large...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def try_send(
    producer: AIOKafkaProducer,
    topic: str,
    value: bytes | None,
    *,
    key: bytes | None = None,
    partition: int | None = None,
) -> asyncio.Future[Any]:
    """Buffer the record and return its delivery future, or raise :class:`NotEnqueued` without waiting."""
    coro = producer.send(topic, value=value, key=key, partition=partition)
    try:
        coro.send(None)
    except StopIteration as done:
        future: asyncio.Future[Any] = done.value
        return future
    except Exception as exc:  # closed producer, record too large, a fatal producer error
        raise NotEnqueued(f"{type(exc).__name__}: {exc}") from exc
    coro.close()
    raise NotEnqueued(f"producer buffer full for {topic} (the partition's batch is full and not yet drained)")


async def warm_metadata(producer: AIOKafkaProducer, topics: Iterable[str]) -> None:
    """Fetch the topics' partition metadata so that :func:`try_send` can enqueue without waiting."""
    for topic in topics:
        await producer.partitions_for(topic)
