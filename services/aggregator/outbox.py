"""``Outbox``: records on their way to one topic through one producer, in order, the caller never waiting.

The seed's compute core hands a closed kline to a bounded channel with ``try_send`` and logs ``DATA_LOSS`` when
the channel is full: its input was a live socket it could not slow down. Here the input is the ``trades`` topic,
a durable log, so a full producer is never a reason to drop a kline: the aggregator puts every output record
into an outbox, which never blocks it, and stops *fetching trades* while its outboxes hold too much
(:attr:`Outbox.pending` against ``persistence.max_in_flight``; see :mod:`services.aggregator.engine`). That is
flow control on the input instead of loss on the output, and the outbox is not a hidden retry buffer: what it
holds is counted, bounded by that flow control, and (for finalized klines) part of the checkpoint's
unconfirmed set, so a crash re-sends it.

Protocol, for every record put:

1. :meth:`Outbox.put` never awaits. While nothing is queued, it encodes the record and hands it to the producer
   at once (:func:`~services.aggregator.sending.try_send`: no task switch, so a kline is on its way the
   instant it closes), up to :data:`CHUNK` records per turn of the event loop (so the caller's own turn stays
   short whatever it puts). If the producer cannot take it without waiting (the partition's batch is full),
   or this turn's budget is spent, the record is queued, and every later record queues behind it: one outbox
   keeps its records in order.
2. One drain task sends the queue in order. It awaits aiokafka's ``send()`` for the head (which waits for the
   partition's batch to drain), then hands over every following record the producer takes at once, and yields
   to the event loop every :data:`CHUNK` records, so encoding a burst of 10^5 klines never stalls the loop
   (health checks, heartbeats and rebalances keep being served).
3. A send that times out or fails before the record was buffered (the broker gone past ``request_timeout_ms``)
   keeps the record at the head; it is tried again after a backoff. Nothing is dropped while the broker is
   away: :attr:`pending` stays high, so the caller's flow control keeps the input stopped meanwhile.
4. A record the producer can never take (too large, the producer closed) ends there: its callback gets a
   failed future with the reason, and the owner decides what that means (a finalized kline: ``DATA_LOSS``).
5. Every record handed over gets its callback when its delivery future resolves (acknowledged or failed); a
   delivery that failed is the owner's to put again.
6. :meth:`flush` waits, up to a timeout, until the queue is empty and every handed-over record resolved
   (graceful stop, rebalance); :meth:`close` stops the drain task and drops the queue (its records are the
   owner's: for finalized klines they are in the checkpoint's unconfirmed set).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from services.aggregator.sending import NotEnqueued, try_send
from services.shared.logs import log_event

log = logging.getLogger("services.aggregator")

T = TypeVar("T")
#: Callback of a record handed over: the item and its resolved delivery future.
Done = Callable[[T, "asyncio.Future[Any]"], None]

#: Records the drain task hands over between two yields to the event loop.
CHUNK: Final = 500
#: Pause before a send that timed out (broker away) is tried again.
RETRY_BACKOFF_S: Final = 0.5


class Outbox(Generic[T]):
    """Items of type ``T`` encoded by ``encode`` into ``(key, value)`` and produced to ``topic`` in order."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        encode: Callable[[T], tuple[bytes | None, bytes]],
        *,
        name: str,
        retry_backoff_s: float = RETRY_BACKOFF_S,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._encode = encode
        self.name = name
        self._backoff = retry_backoff_s
        self._queue: deque[tuple[T, Done[T] | None]] = deque()
        self._awaiting = 0
        self._drainer: asyncio.Task[None] | None = None
        self._closed = False
        self._inline = 0  # records handed over by put() itself during this turn of the event loop
        self._settled = asyncio.Event()
        self._settled.set()
        self.sent = 0
        self.queued_total = 0
        self.send_retries = 0
        self.longest_wait_s = 0.0

    # ------------------------------------------------------------------------------------------ state

    @property
    def queued(self) -> int:
        """Records not yet handed to the producer."""
        return len(self._queue)

    @property
    def pending(self) -> int:
        """Records not yet resolved: queued, or handed over and awaiting their acknowledgement."""
        return len(self._queue) + self._awaiting

    # ------------------------------------------------------------------------------------------ put (step 1)

    def put(self, item: T, done: Done[T] | None = None) -> None:
        """Hand ``item`` to the producer now if it takes it without waiting, else queue it; never awaits."""
        if self._closed:
            self._fail(item, done, "the outbox is closed (the service is stopping)")
            return
        self._settled.clear()
        if not self._queue and self._inline < CHUNK:
            if not self._inline:  # the budget renews on the event loop's next turn
                asyncio.get_running_loop().call_soon(self._renew_inline)
            self._inline += 1
            if self._hand_over(item, done):
                return
        self._queue.append((item, done))
        self.queued_total += 1
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain(), name=f"outbox-{self.name}")

    def _renew_inline(self) -> None:
        self._inline = 0

    def _hand_over(self, item: T, done: Done[T] | None) -> bool:
        """Step 1/2: try_send; True once the producer holds the record (or it failed for good, step 4)."""
        key, value = self._encode(item)
        try:
            future = try_send(self._producer, self._topic, value, key=key)
        except NotEnqueued as exc:
            if exc.reason.startswith("producer buffer full"):
                return False
            self._fail(item, done, exc.reason)
            return True
        self._track(item, done, future)
        return True

    def _track(self, item: T, done: Done[T] | None, future: asyncio.Future[Any]) -> None:
        self._awaiting += 1
        self.sent += 1
        future.add_done_callback(lambda resolved: self._resolved(item, done, resolved))

    def _resolved(self, item: T, done: Done[T] | None, future: asyncio.Future[Any]) -> None:
        self._awaiting -= 1
        if not self._queue and not self._awaiting:
            self._settled.set()
        if done is not None:
            done(item, future)

    def _fail(self, item: T, done: Done[T] | None, reason: str) -> None:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_exception(NotEnqueued(reason))
        if not self._queue and not self._awaiting:
            self._settled.set()
        if done is not None:
            done(item, future)

    # ------------------------------------------------------------------------------------------ drain (2-4)

    async def _drain(self) -> None:
        queue = self._queue
        outage_since: float | None = None
        while queue and not self._closed:
            item, done = queue[0]
            started = time.monotonic()
            key, value = self._encode(item)
            try:
                future = await self._producer.send(self._topic, value, key=key)
            except KafkaTimeoutError as exc:
                # Step 3: the broker is away; keep the record, try again (input stays stopped meanwhile).
                self.send_retries += 1
                if outage_since is None:
                    outage_since = started
                    log_event(
                        log,
                        logging.WARNING,
                        "the producer does not take records; they stay queued and input waits",
                        outbox=self.name,
                        queued=len(queue),
                        error=repr(exc),
                    )
                await asyncio.sleep(self._backoff)
                continue
            except Exception as exc:  # step 4: the producer can never take this record (closed, too large)
                queue.popleft()
                self._fail(item, done, f"{type(exc).__name__}: {exc}")
                continue
            if outage_since is not None:
                log_event(
                    log,
                    logging.INFO,
                    "the producer takes records again",
                    outbox=self.name,
                    seconds=round(time.monotonic() - outage_since, 3),
                )
                outage_since = None
            queue.popleft()
            self._track(item, done, future)
            self.longest_wait_s = max(self.longest_wait_s, time.monotonic() - started)
            handed = 0
            while queue and handed < CHUNK:
                item, done = queue[0]
                if not self._hand_over(item, done):
                    break
                queue.popleft()
                handed += 1
            await asyncio.sleep(0)
        if not queue and not self._awaiting:
            self._settled.set()

    # ------------------------------------------------------------------------------------------ stop (6)

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything put is resolved; False if ``timeout_s`` passed first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), max(0.0, timeout_s))
        return self._settled.is_set()

    def drop(self, keep: Callable[[T], bool]) -> int:
        """Forget the queued items ``keep`` refuses (their owner is gone); how many were dropped."""
        queue = self._queue
        kept = [entry for entry in queue if keep(entry[0])]
        dropped = len(queue) - len(kept)
        queue.clear()
        queue.extend(kept)
        if not self._queue and not self._awaiting:
            self._settled.set()
        return dropped

    async def close(self) -> None:
        """Stop the drain task; queued records stay unsent (their owner has them, see step 6)."""
        self._closed = True
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
