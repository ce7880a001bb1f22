"""The publisher: walks the tape's timeline and publishes each trade when market time reaches its ``T``.

Publishing a trade means two things at once: it becomes public on REST (the symbol tape's ``published`` count)
and its frame goes to every subscribed WebSocket (unless a fault says otherwise). The loop:

1. wait while market time is not running (not started yet, or paused);
2. real-time mode (``speed > 0``): publish every trade with ``T <= now`` (at most one batch), then sleep until
   the next trade is due — never a sleep per trade;
3. fast mode (``speed = 0``): publish the next batch, move market time to its last ``T``, and wait only while a
   connection is too far behind (backpressure instead of loss);
4. when the tape is done and market time has reached the feed's end, release frames held by a reorder fault
   and set :attr:`Publisher.exhausted`.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections import Counter

from services.replay.batch import Batch
from services.replay.clock import PlaybackClock
from services.replay.faults import FaultState
from services.replay.streams import StreamHub
from services.replay.tape import MarketTape

BATCH = 4096
#: Longest sleep without looking at the clock again, so an injected clock that jumps is noticed promptly.
MAX_SLEEP_S = 0.05


class Publisher:
    """Publishes the tape against the playback clock; run it as one task."""

    def __init__(self, tape: MarketTape, clock: PlaybackClock, hub: StreamHub, faults: FaultState) -> None:
        self.tape = tape
        self.clock = clock
        self.hub = hub
        self.faults = faults
        self.cursor = 0
        self.exhausted = asyncio.Event()
        self._changed = asyncio.Event()

    def start(self) -> None:
        """Start market time (idempotent; does not undo a pause)."""
        self.clock.start()
        self._changed.set()

    def pause(self) -> None:
        """Freeze market time."""
        self.clock.pause()
        self._changed.set()

    def resume(self) -> None:
        """Unfreeze (or start) market time."""
        self.clock.resume()
        self._changed.set()

    async def _sleep(self, seconds: float | None) -> None:
        """Sleep up to ``seconds`` (None = until woken; at most MAX_SLEEP_S), returning early on start/pause/resume."""
        if seconds is not None:
            seconds = min(seconds, MAX_SLEEP_S)
        self._changed.clear()
        try:
            async with asyncio.timeout(seconds):
                await self._changed.wait()
        except TimeoutError:
            pass

    async def run(self) -> None:
        """The publishing loop (see the module docstring); returns once the feed is exhausted."""
        times = self.tape.timeline_times
        total = len(times)
        clock = self.clock
        while True:
            if not clock.running:
                await self._sleep(None)
                continue
            if self.cursor >= total:
                if clock.fast:
                    clock.finish()
                wait = clock.real_seconds_until(clock.end_ms)
                if wait is not None and wait > 0:
                    await self._sleep(wait)
                    continue
                held = self.faults.release_held()
                if len(held):
                    self.hub.broadcast(held)
                self.exhausted.set()
                return
            if clock.fast:
                hi = min(self.cursor + BATCH, total)
                clock.jump_to(times[hi - 1])
                self._publish(hi)
                await self.hub.wait_for_room()
                await asyncio.sleep(0)
                continue
            hi = bisect_right(times, clock.now_ms(), self.cursor, min(total, self.cursor + BATCH))
            if hi > self.cursor:
                self._publish(hi)
                await asyncio.sleep(0)
                continue
            await self._sleep(clock.real_seconds_until(times[self.cursor]))

    def _publish(self, hi: int) -> None:
        """Publish timeline entries ``[cursor, hi)``: REST sees them, connections get their frames."""
        tape = self.tape
        lo = self.cursor
        symbols = tape.timeline_symbols[lo:hi]
        if self.faults.active:
            tapes = tape.by_index
            counts = [t.published for t in tapes]
            triples: list[tuple[int, int, str]] = []
            for s in symbols:
                k = counts[s]
                counts[s] = k + 1
                triples.append((s, tapes[s].ids[k], tapes[s].payloads[k]))
            batch = self.faults.apply(triples)
        else:
            batch = Batch(symbols, tape.timeline_payloads[lo:hi])
        for index, count in Counter(symbols).items():
            tape.by_index[index].published += count
        self.cursor = hi
        self.hub.broadcast(batch)
