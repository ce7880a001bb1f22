"""The writer engine's edges: what it needs of Kafka, ClickHouse, the dead-letter topic and time.

Each is a small ``Protocol`` or callable type, so every step of the protocol can be driven and failed exactly in
tests; the real adapters live here too (:class:`KafkaDeadLetters`, :func:`clickhouse_inserter`,
:class:`SystemClock`), and :func:`run_in_worker_thread` runs a blocking insert without holding up the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from services.shared.clickhouse import insert_klines, insert_select_text
from services.shared.messages import DecodedKline
from services.shared.settings import ClickHouseSettings
from services.writers.contract import VALUES_STRUCTURE, KlineValues, RowRule, insert_statement

T = TypeVar("T")

Row = tuple[Any, ...]
InsertFn = Callable[[Sequence[Row] | KlineValues, str], None]
"""Blocking insert of a batch with a deduplication token; runs in a worker thread. The engine passes a
:class:`~services.writers.contract.KlineValues` (ClickHouse parses and checks; raises
:class:`~services.shared.clickhouse.ClickHouseRejected` when a record breaks the contract) or validated rows, a
:class:`~services.shared.clickhouse.KlineRows`, which the real insert encodes without building the tuples."""
CommitFn = Callable[[Mapping[Any, tuple[int, str]]], Awaitable[None]]
"""Commit ``{TopicPartition: (next offset, metadata)}``; :meth:`AIOKafkaConsumer.commit` by default."""
DecodeFn = Callable[[bytes | None], DecodedKline]
"""Decode a record's value or raise :class:`InvalidInput`; :func:`~services.shared.messages.decode_kline_record`."""


class Clock(Protocol):
    """Monotonic time and sleeping, injected so tests can jump time."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ConsumerRecordLike(Protocol):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class ConsumerLike(Protocol):
    """The part of :class:`aiokafka.AIOKafkaConsumer` the engine uses."""

    async def getmany(
        self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[Any, list[Any]]: ...

    def assignment(self) -> set[Any]: ...

    def pause(self, *partitions: Any) -> None: ...

    def resume(self, *partitions: Any) -> None: ...

    def highwater(self, partition: Any) -> int | None: ...

    async def commit(self, offsets: Any = None) -> None: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected record on its way to the dead-letter topic: its key, the JSON envelope, and where it was."""

    key: bytes | None
    value: bytes
    partition: int
    offset: int
    reason: str


class DeadLetterSink(Protocol):
    async def deliver(self, letters: Sequence[DeadLetter]) -> None:
        """Return only when every letter is acknowledged by the broker; raise otherwise."""
        ...


class KafkaDeadLetters:
    """Delivers dead letters to the dead-letter topic with the (idempotent, ``acks=all``) producer."""

    def __init__(self, producer: Any, topic: str, timeout_s: float) -> None:
        self._producer = producer
        self._topic = topic
        self._timeout_s = timeout_s

    async def deliver(self, letters: Sequence[DeadLetter]) -> None:
        async def send_all() -> None:
            futures = [await self._producer.send(self._topic, key=d.key, value=d.value) for d in letters]
            await asyncio.gather(*futures)

        await asyncio.wait_for(send_all(), self._timeout_s)


def clickhouse_inserter(client: Any, settings: ClickHouseSettings, table: str) -> InsertFn:
    """The real insert into ``table`` (blocking; the engine runs it in a worker thread): fetched values through
    the contract's ``INSERT ... SELECT`` (:func:`~services.writers.contract.insert_statement`), validated rows
    through the shared write path (:func:`~services.shared.clickhouse.insert_klines`)."""
    statements: dict[RowRule, str] = {}

    def insert_rows(rows: Sequence[Row] | KlineValues, token: str) -> None:
        if isinstance(rows, KlineValues):
            statement = statements.get(rows.rule)
            if statement is None:
                statement = statements[rows.rule] = insert_statement(settings.database, table, rows.rule)
            insert_select_text(client, settings, statement, VALUES_STRUCTURE, rows.body, token)
        else:
            insert_klines(client, settings, table, rows, token)

    return insert_rows


async def run_in_worker_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call in a daemon thread and await its result; the event loop stays free meanwhile.

    Why not :func:`asyncio.to_thread`: its executor threads are joined at interpreter exit, so an insert hung
    on an unreachable server would hold the process past its shutdown grace period. A daemon thread is
    abandoned instead (its batch was not committed, so nothing is lost).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=target, name=f"insert-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await future
