"""``try_send`` enqueues or refuses at once; and the clocks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.aggregator.clock import EventClock, ManualClock, WallClock, make_clock
from services.aggregator.sending import NotEnqueued, try_send

pytestmark = pytest.mark.unit


class ScriptedProducer:
    """``send()`` like aiokafka's: returns a future at once, or suspends (full), or raises."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.sent: list[tuple[str, bytes | None, bytes | None, int | None]] = []
        self.suspended_and_closed = False

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, partition: int | None = None
    ) -> Any:
        if self.behaviour == "raise":
            raise RuntimeError("producer closed")
        if self.behaviour == "full":
            try:
                await asyncio.get_running_loop().create_future()  # waits for the batch to drain
            except GeneratorExit:
                self.suspended_and_closed = True
                raise
        self.sent.append((topic, key, value, partition))
        return asyncio.get_running_loop().create_future()


async def test_a_free_buffer_enqueues_and_returns_the_delivery_future() -> None:
    producer = ScriptedProducer("ok")
    future = try_send(producer, "t", b"v", key=b"k", partition=2)
    assert isinstance(future, asyncio.Future) and not future.done()
    assert producer.sent == [("t", b"k", b"v", 2)]


async def test_a_full_buffer_is_refused_without_waiting_and_nothing_is_enqueued() -> None:
    producer = ScriptedProducer("full")
    with pytest.raises(NotEnqueued, match="buffer full"):
        try_send(producer, "t", b"v")
    assert producer.sent == [] and producer.suspended_and_closed


async def test_a_producer_error_is_refused_with_its_reason() -> None:
    with pytest.raises(NotEnqueued, match="RuntimeError: producer closed"):
        try_send(ScriptedProducer("raise"), "t", b"v")


def test_clocks() -> None:
    assert WallClock(lambda: 1_700_000_000.5).now_ms() == 1_700_000_000_500
    manual = ManualClock()
    assert manual.now_ms() is None
    manual.set(10)
    manual.set(5)  # never backwards
    manual.advance(3)
    assert manual.now_ms() == 13
    with pytest.raises(ValueError, match="cannot go back"):
        manual.advance(-1)
    assert isinstance(make_clock("event"), EventClock)
    assert make_clock("event").now_ms() is None  # replays: klines close only by trades
    with pytest.raises(ValueError, match="unknown clock"):
        make_clock("sundial")
