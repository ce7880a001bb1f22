"""REST backfill: repair holes in a symbol's ``a`` sequence, or give them up as explicit gaps.

One task per symbol at a time (at most ``concurrency`` requests in flight across symbols). The task runs until
the sequencer has nothing missing for the symbol:

1. ask the sequencer for the missing range ``last + 1 .. min(held) - 1`` (open-ended when nothing is held:
   a catch-up after a restart, which ends with a short page);
2. wait while the publishing side is full (outbox + unacknowledged sends >= the queue size): a long catch-up
   must not outrun Kafka;
3. ``GET aggTrades?fromId=last+1&limit=1000`` and hand the page to the sequencer, which publishes the
   contiguous part and releases held live trades that became contiguous;
4. 429: wait ``Retry-After`` (the REST client pauses every request) and go on; 418 (banned): wait until the ban
   ends if that is within ``max_ban_wait_s`` (the held live trades wait with it) and go on; a longer ban, a hole
   wider than ``max_gap_ids``, ``max_attempts`` failed requests in a row, or ``max_attempts`` pages in a row that add
   nothing while a hole remains (the exchange does not serve those ids): publish the hole as a gap event and
   log it with ``log_type=DATA_LOSS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from services.ingest.frames import wire_trade
from services.ingest.rest import Banned, ExchangeRest, RateLimited, RestError
from services.ingest.sequencer import Sequencer
from services.shared.logs import log_event
from services.shared.messages import Gap

log = logging.getLogger("services.ingest.backfill")


@dataclass(frozen=True, slots=True)
class BackfillOptions:
    page_limit: int = 1000
    concurrency: int = 4
    max_attempts: int = 5
    retry_s: float = 0.5
    max_gap_ids: int = 5_000_000
    max_ban_wait_s: float = 30.0


class Backfiller:
    """Runs the per-symbol repair tasks (see the module docstring)."""

    def __init__(
        self,
        sequencer: Sequencer,
        rest: ExchangeRest,
        *,
        clock: Callable[[], float],
        options: BackfillOptions,
        room: Callable[[], Awaitable[None]],
        on_gap: Callable[[Gap], None],
    ) -> None:
        self.sequencer = sequencer
        self.rest = rest
        self.options = options
        self._clock = clock
        self._room = room
        self._on_gap = on_gap
        self._semaphore = asyncio.Semaphore(options.concurrency)
        # Catch-ups (after a restart or reconnect: possibly every symbol of a shard, most with nothing to
        # fetch) go one at a time, so that repairs of holes in active symbols are not queued behind them.
        self._catch_up_gate = asyncio.Semaphore(1)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.catch_ups = 0
        self.failed_requests = 0

    @property
    def active(self) -> int:
        return len(self._tasks)

    def repair(self, symbol: str) -> None:
        """Repair the hole :meth:`Sequencer.due` reported for ``symbol`` (already marked backfilling)."""
        self._spawn(symbol, catch_up=False)

    def catch_up(self, symbol: str) -> None:
        """Fetch everything after ``symbol``'s known last id (after a restart or a re-add)."""
        if self.sequencer.begin_catch_up(symbol):
            self.catch_ups += 1
            self._spawn(symbol, catch_up=True)

    def running(self, symbols: Iterable[str]) -> list[asyncio.Task[None]]:
        """The backfill tasks still running for ``symbols``."""
        tasks = (self._tasks.get(symbol) for symbol in symbols)
        return [task for task in tasks if task is not None and not task.done()]

    def cancel(self, symbol: str) -> None:
        task = self._tasks.pop(symbol, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, symbol: str, *, catch_up: bool) -> None:
        previous = self._tasks.get(symbol)
        if previous is not None and not previous.done():
            log.warning("backfill of %s already running", symbol)
            return
        task = asyncio.create_task(self._run(symbol, catch_up), name=f"backfill-{symbol}")
        self._tasks[symbol] = task
        task.add_done_callback(functools.partial(self._done, symbol))

    def _done(self, symbol: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(symbol) is task:
            del self._tasks[symbol]
        if not task.cancelled() and task.exception() is not None:
            log.error("backfill of %s failed", symbol, exc_info=task.exception())

    async def _run(self, symbol: str, catch_up: bool) -> None:
        seq = self.sequencer
        opts = self.options
        repaired = False
        caught_up = False
        failures = 0
        fruitless = 0
        try:
            while True:
                missing = seq.backfill_range(symbol)
                if missing is None:
                    return
                from_a, to_a = missing
                if to_a is None and (caught_up or not catch_up):
                    repaired = not catch_up
                    return
                if to_a is not None and to_a - from_a + 1 > opts.max_gap_ids:
                    self._give_up(symbol, f"gap of {to_a - from_a + 1} ids exceeds max_gap_ids={opts.max_gap_ids}")
                    return
                if self.rest.banned and not await self._wait_out_ban(symbol):
                    return
                await self._room()
                try:
                    async with contextlib.AsyncExitStack() as gates:
                        if catch_up and to_a is None:
                            await gates.enter_async_context(self._catch_up_gate)
                        await gates.enter_async_context(self._semaphore)
                        trades = await self.rest.agg_trades(symbol, from_a, opts.page_limit)
                except RateLimited as exc:
                    log_event(log, logging.WARNING, "backfill rate limited", symbol=symbol, error=str(exc))
                    continue
                except Banned:
                    if await self._wait_out_ban(symbol):
                        continue
                    return
                except RestError as exc:
                    failures += 1
                    self.failed_requests += 1
                    if failures >= opts.max_attempts:
                        self._give_up(symbol, f"backfill failed {failures} times: {exc}")
                        return
                    log_event(log, logging.WARNING, "backfill request failed", symbol=symbol, error=str(exc))
                    await asyncio.sleep(opts.retry_s * failures)
                    continue
                failures = 0
                accepted = seq.offer_backfill(symbol, map(wire_trade, trades), self._clock())
                if catch_up and to_a is None and len(trades) < opts.page_limit and (accepted or not trades):
                    caught_up = True
                if accepted:
                    fruitless = 0
                    continue
                if to_a is None and not trades:
                    continue  # caught up (loop ends above)
                fruitless += 1
                if fruitless >= opts.max_attempts:
                    first = trades[0].a - 1 if trades else None
                    self._give_up(
                        symbol, f"the exchange's REST does not serve ids from {from_a} ({fruitless} tries)", first
                    )
                    return
                await asyncio.sleep(opts.retry_s)
        finally:
            # A cancelled task (symbol removed, or a newer task) no longer owns the symbol's state.
            if self._tasks.get(symbol) is asyncio.current_task():
                with contextlib.suppress(Exception):
                    seq.end_backfill(symbol, repaired=repaired, now=self._clock())

    async def _wait_out_ban(self, symbol: str) -> bool:
        """418: wait for the ban to end and return True, or, when it lasts longer than ``max_ban_wait_s``, give the
        hole up as a gap and return False (step 4). No request goes out meanwhile."""
        remaining = self.rest.banned_until - self._clock()
        if remaining > self.options.max_ban_wait_s:
            self._give_up(symbol, f"REST backfill unavailable: IP banned (418) for {remaining:.0f} s more")
            return False
        log_event(
            log, logging.WARNING, "backfill waits for a REST ban to end", symbol=symbol, seconds=round(remaining, 1)
        )
        await asyncio.sleep(max(0.0, remaining))
        return True

    def _give_up(self, symbol: str, reason: str, to_a: int | None = None) -> None:
        gap = self.sequencer.declare_gap(symbol, reason, self._clock(), to_a)
        if gap is not None:
            self._on_gap(gap)
