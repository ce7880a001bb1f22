"""The outbox's protocol, step by step, against a producer with aiokafka's ``send()`` contract."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from services.aggregator.outbox import CHUNK, Outbox
from services.aggregator.sending import NotEnqueued

pytestmark = pytest.mark.unit


class Producer:
    """Takes ``capacity`` records without waiting; the next ``send()`` waits until :meth:`deliver` (or raises
    what :attr:`errors` holds next, as aiokafka raises a send timeout while the broker is away)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffered: list[tuple[bytes, asyncio.Future[Any]]] = []
        self.delivered: list[bytes] = []
        self.errors: list[Exception] = []
        self.too_large: set[bytes] = set()
        self.drained = asyncio.Event()

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
    ) -> asyncio.Future[Any]:
        if value in self.too_large:  # aiokafka checks the size before anything else
            raise MessageSizeTooLargeError()
        while len(self.buffered) >= self.capacity:
            if self.errors:
                await asyncio.sleep(0)  # aiokafka raises these only after waiting
                raise self.errors.pop(0)
            self.drained.clear()
            await self.drained.wait()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.buffered.append((value, future))
        return future

    def deliver(self, fail: bool = False) -> None:
        ready, self.buffered = self.buffered, []
        for value, future in ready:
            if fail:
                future.set_exception(RuntimeError("not acknowledged"))
            else:
                self.delivered.append(value)
                future.set_result(None)
        self.drained.set()


def encode(item: int) -> tuple[bytes | None, bytes]:
    return None, str(item).encode()


async def settle(producer: Producer, outbox: Outbox[int], rounds: int = 200) -> None:
    for _ in range(rounds):
        producer.deliver()
        await asyncio.sleep(0)
        if not outbox.pending:
            return
    raise AssertionError(f"still pending: {outbox.pending}")


async def test_put_hands_over_at_once_and_queues_in_order_once_the_producer_is_full() -> None:
    producer = Producer(capacity=3)
    outbox: Outbox[int] = Outbox(producer, "t", encode, name="test")
    done: list[int] = []
    for item in range(10):
        outbox.put(item, lambda item, future: done.append(item))
    assert [v for v, _ in producer.buffered] == [b"0", b"1", b"2"]  # step 1: no task switch needed
    assert outbox.queued == 7 and outbox.pending == 10
    await settle(producer, outbox)
    assert producer.delivered == [str(i).encode() for i in range(10)]  # step 2: order kept
    assert sorted(done) == list(range(10)) and outbox.pending == 0


async def test_a_burst_is_handed_over_in_chunks_that_let_the_loop_run() -> None:
    producer = Producer(capacity=10**9)
    outbox: Outbox[int] = Outbox(producer, "t", encode, name="test")
    producer.capacity = 0  # full: everything queues
    for item in range(3 * CHUNK):
        outbox.put(item)
    producer.capacity = 10**9
    producer.drained.set()
    ticks = 0
    while outbox.queued:
        await asyncio.sleep(0)
        ticks += 1
    assert ticks >= 3  # the drain task yielded between chunks
    await settle(producer, outbox)
    assert len(producer.delivered) == 3 * CHUNK


async def test_a_send_timeout_keeps_the_record_and_tries_again() -> None:
    producer = Producer(capacity=1)
    outbox: Outbox[int] = Outbox(producer, "t", encode, name="test", retry_backoff_s=0.01)
    outbox.put(0)
    producer.errors = [KafkaTimeoutError(), KafkaTimeoutError()]  # step 3: the broker is away, twice
    outbox.put(1)
    await asyncio.sleep(0.05)
    assert outbox.send_retries == 2 and outbox.queued == 1
    await settle(producer, outbox)
    assert producer.delivered == [b"0", b"1"]


async def test_a_record_the_producer_can_never_take_fails_its_callback_and_the_rest_go_on() -> None:
    producer = Producer(capacity=1)
    outbox: Outbox[int] = Outbox(producer, "t", encode, name="test")
    failed: list[tuple[int, BaseException | None]] = []

    def done(item: int, future: asyncio.Future[Any]) -> None:
        if future.exception() is not None:
            failed.append((item, future.exception()))

    producer.too_large = {b"1", b"3"}  # step 4
    outbox.put(0, done)
    outbox.put(1, done)  # refused at once (nothing queued yet)
    outbox.put(2, done)  # the producer is full: queued
    outbox.put(3, done)  # queued, refused by the drain task
    outbox.put(4, done)
    await settle(producer, outbox)
    assert [item for item, _ in failed] == [1, 3] and all(isinstance(e, NotEnqueued) for _, e in failed)
    assert producer.delivered == [b"0", b"2", b"4"]


async def test_a_failed_delivery_reaches_the_callback_and_flush_waits_for_every_record() -> None:
    producer = Producer(capacity=5)
    outbox: Outbox[int] = Outbox(producer, "t", encode, name="test")
    results: list[bool] = []
    for item in range(3):
        outbox.put(item, lambda item, future: results.append(future.exception() is None))
    assert not await outbox.flush(0.01)
    producer.deliver(fail=True)  # step 5: the owner decides (the engine puts a finalized kline again)
    assert await outbox.flush(0.5)
    assert results == [False, False, False]


async def test_drop_forgets_queued_items_of_a_gone_owner_and_close_stops_the_drain() -> None:
    producer = Producer(capacity=1)
    outbox: Outbox[int] = Outbox(producer, "t", encode, name="test")
    for item in range(6):
        outbox.put(item)
    assert outbox.drop(lambda item: item % 2 == 0) == 3  # 1, 3, 5 were queued; 0 was handed over
    await settle(producer, outbox)
    assert producer.delivered == [b"0", b"2", b"4"]
    await outbox.close()
    refused: list[bool] = []
    outbox.put(9, lambda item, future: refused.append(isinstance(future.exception(), NotEnqueued)))
    assert refused == [True]
