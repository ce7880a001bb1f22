"""Fault injection: the ways a real Binance connection goes wrong, on command.

:class:`Faults` is the Python API (``exchange.faults``); the HTTP control endpoints (:mod:`services.replay.control`)
call the same methods. What each fault does:

* ``drop_connections()`` — every WebSocket connection is closed abruptly (TCP reset, no close frame).
* ``stall(seconds)`` — existing connections stop receiving anything (frames, pings) without being closed;
  frames published meanwhile are held and delivered when the stall ends, unless the client gave up first.
* ``skip_trades(symbol, first_id, last_id)`` — those aggregate ids are never sent on any WebSocket, but they
  are published: REST ``aggTrades`` serves them, which is how a client repairs the gap.
* ``duplicate_frames(count, symbol)`` — the next ``count`` trade frames are each sent twice in a row.
* ``reorder_frames(count, symbol)`` — the next ``count`` pairs of neighbouring frames of one symbol are swapped.
* ``send_malformed(kind, symbol)`` — one malformed frame to every connection subscribed to the symbol (any
  symbol if None): ``bad_json``, ``missing_field`` (no ``p``), ``wrong_type`` (``a`` a string, ``q`` a number),
  ``negative_price``. A malformed frame reuses the symbol's last published ``a`` (before the first trade: the
  first id minus one), so it never shadows a trade still to come and a client that rejects it loses nothing.
* ``future_time(count, symbol, time_ms)`` — the next ``count`` trade frames (of the symbol, or of any) carry
  ``T = time_ms`` (default 2090-01-01) instead of their own time: a feed whose timestamps cannot be true. REST
  ``aggTrades`` still serves the true trades.
* ``server_shutdown(close_after_s)`` — ``{"e":"serverShutdown","E":...}`` to every connection, then a normal
  close (1001) after the delay.
* ``pause_feed()`` / ``resume_feed()`` — market time stops and resumes; ``resume_feed`` also starts a feed that
  waits for its first subscriber or was configured never to start by itself.
* ``set_rate_limit(weight_limit, window_s)`` — REST request-weight limit (429 with ``Retry-After``); None = off.
* ``ban(seconds)`` — every REST request is answered 418 (IP banned, ``Retry-After``) for ``seconds``.
* ``connection_lifetime(seconds)`` — every WebSocket connection is closed (1001, "connection lifetime reached") once
  it has been open ``seconds`` (counted from when the fault is set for the connections open then), as Binance
  closes a connection at 24 h; new connections are rotated the same way until it is set to None.

:class:`FaultState` holds the per-trade faults the publisher applies; it is plain data, no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, get_args

from services.replay.batch import Batch

if TYPE_CHECKING:
    from services.replay.rest import WeightLimiter
    from services.replay.streams import StreamHub
    from services.replay.tape import MarketTape

MalformedKind = Literal["bad_json", "missing_field", "wrong_type", "negative_price"]
MALFORMED_KINDS: tuple[str, ...] = get_args(MalformedKind)
#: The default trade time of ``future_time``: 2090-01-01 UTC.
FUTURE_TIME_MS = 3_786_912_000_000


class FeedSwitch(Protocol):
    """What the faults need of the publisher: stopping and restarting market time."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


@dataclass
class FaultState:
    """Per-trade faults waiting to be applied by the publisher. Keys are symbol indexes; None = any symbol."""

    skips: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    duplicates: dict[int | None, int] = field(default_factory=dict)
    reorders: dict[int | None, int] = field(default_factory=dict)
    held: dict[int, str] = field(default_factory=dict)  # reorder: a frame waiting for its successor
    warps: dict[int | None, int] = field(default_factory=dict)  # future_time: frames still to warp
    warp_to_ms: int = FUTURE_TIME_MS

    @property
    def active(self) -> bool:
        """Whether the publisher must look at each trade (the fast path skips all of this)."""
        return bool(self.skips or self.duplicates or self.reorders or self.held or self.warps)

    def apply(self, trades: list[tuple[int, int, str]]) -> Batch:
        """Turn (symbol index, a, payload) triples into the frames to send, consuming the pending faults."""
        symbols: list[int] = []
        payloads: list[str] = []

        def send(symbol_index: int, payload: str) -> None:
            symbols.append(symbol_index)
            payloads.append(payload)

        for symbol_index, agg_id, payload in trades:
            ranges = self.skips.get(symbol_index)
            if ranges and any(lo <= agg_id <= hi for lo, hi in ranges):
                continue
            if self.warps and self._take(self.warps, symbol_index):
                payload = _with_time(payload, self.warp_to_ms)
            held = self.held.pop(symbol_index, None)
            if held is not None:  # the successor of a held frame: send it first, then the held one
                send(symbol_index, payload)
                send(symbol_index, held)
                continue
            if self._take(self.duplicates, symbol_index):
                send(symbol_index, payload)
                send(symbol_index, payload)
                continue
            if self._take(self.reorders, symbol_index):
                self.held[symbol_index] = payload
                continue
            send(symbol_index, payload)
        return Batch(symbols, payloads)

    def release_held(self) -> Batch:
        """Frames held back for a swap that will never come (the feed ended)."""
        batch = Batch(list(self.held), list(self.held.values()))
        self.held.clear()
        return batch

    @staticmethod
    def _take(counters: dict[int | None, int], symbol_index: int) -> bool:
        for key in (symbol_index, None):
            remaining = counters.get(key, 0)
            if remaining > 0:
                if remaining == 1:
                    del counters[key]
                else:
                    counters[key] = remaining - 1
                return True
        return False


def _with_time(payload: str, time_ms: int) -> str:
    data = json.loads(payload)
    data["T"] = time_ms
    return json.dumps(data, separators=(",", ":"))


def malformed_payload(kind: str, last_payload: str) -> str:
    """A broken variant of a real aggTrade payload (see the module docstring for the kinds)."""
    if kind == "bad_json":
        return last_payload[: len(last_payload) // 2]
    data = json.loads(last_payload)
    if kind == "missing_field":
        del data["p"]
    elif kind == "wrong_type":
        data["a"] = str(data["a"])
        data["q"] = float(data["q"])
    elif kind == "negative_price":
        data["p"] = "-" + data["p"]
    else:
        raise ValueError(f"unknown malformed kind {kind!r}; expected one of {', '.join(MALFORMED_KINDS)}")
    return json.dumps(data, separators=(",", ":"))


class Faults:
    """Inject faults into a running exchange (see the module docstring for what each one does)."""

    def __init__(
        self,
        *,
        tape: MarketTape,
        state: FaultState,
        hub: StreamHub,
        publisher: FeedSwitch,
        limiter: WeightLimiter,
        market_time_ms: Callable[[], int],
    ) -> None:
        self._tape = tape
        self._state = state
        self._hub = hub
        self._publisher = publisher
        self._limiter = limiter
        self._market_time_ms = market_time_ms
        self._lifetime_task: asyncio.Task[None] | None = None

    def _symbol_index(self, symbol: str | None) -> int | None:
        if symbol is None:
            return None
        tape = self._tape.get(symbol.upper())
        if tape is None:
            raise ValueError(f"unknown symbol {symbol!r}; this exchange lists {', '.join(self._tape.symbols)}")
        return tape.index

    def drop_connections(self) -> int:
        """Close every WebSocket connection abruptly; returns how many were dropped."""
        return self._hub.drop_all()

    def stall(self, seconds: float) -> int:
        """Stop sending to the existing connections for ``seconds`` without closing them; returns how many."""
        if seconds <= 0:
            raise ValueError(f"stall seconds must be positive, got {seconds}")
        return self._hub.stall_all(seconds)

    def skip_trades(self, symbol: str, first_id: int, last_id: int) -> None:
        """Never send aggregate ids ``first_id..last_id`` (inclusive) of ``symbol`` on the WebSocket."""
        if last_id < first_id:
            raise ValueError(f"last_id {last_id} is before first_id {first_id}")
        index = self._symbol_index(symbol)
        assert index is not None
        self._state.skips.setdefault(index, []).append((first_id, last_id))

    def duplicate_frames(self, count: int = 1, symbol: str | None = None) -> None:
        """Send each of the next ``count`` trade frames (of ``symbol``, or of any symbol) twice."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        key = self._symbol_index(symbol)
        self._state.duplicates[key] = self._state.duplicates.get(key, 0) + count

    def reorder_frames(self, count: int = 1, symbol: str | None = None) -> None:
        """Swap the next ``count`` pairs of neighbouring frames of one symbol (``symbol``, or any)."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        key = self._symbol_index(symbol)
        self._state.reorders[key] = self._state.reorders.get(key, 0) + count

    def future_time(self, count: int = 1, symbol: str | None = None, time_ms: int = FUTURE_TIME_MS) -> None:
        """Send the next ``count`` trade frames (of ``symbol``, or of any symbol) with ``T = time_ms``."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        key = self._symbol_index(symbol)
        self._state.warp_to_ms = time_ms
        self._state.warps[key] = self._state.warps.get(key, 0) + count

    def send_malformed(self, kind: str, symbol: str | None = None) -> int:
        """Send one malformed frame of ``kind`` to each subscribed connection; returns how many were sent."""
        if kind not in MALFORMED_KINDS:
            raise ValueError(f"unknown malformed kind {kind!r}; expected one of {', '.join(MALFORMED_KINDS)}")
        index = self._symbol_index(symbol)
        payloads: dict[int, str] = {}
        for tape in self._tape.by_index:
            if (index is not None and tape.index != index) or not tape.payloads:
                continue
            if tape.published:
                source = tape.payloads[tape.published - 1]
            else:  # nothing public yet: the first trade's shape under an id just before it
                first = json.loads(tape.payloads[0])
                first["a"] -= 1
                source = json.dumps(first, separators=(",", ":"))
            payloads[tape.index] = malformed_payload(kind, source)
        return self._hub.send_malformed(payloads)

    def server_shutdown(self, close_after_s: float | None = None) -> int:
        """Send ``serverShutdown`` to every connection and close them after the delay; returns how many."""
        if close_after_s is not None and close_after_s < 0:
            raise ValueError(f"close_after_s must be >= 0, got {close_after_s}")
        return self._hub.server_shutdown(self._market_time_ms(), close_after_s)

    def pause_feed(self) -> None:
        """Freeze market time: nothing is published until :meth:`resume_feed`."""
        self._publisher.pause()

    def resume_feed(self) -> None:
        """Let market time run again (also starts a feed that has not started yet)."""
        self._publisher.resume()

    def set_rate_limit(self, weight_limit: int | None, window_s: float = 60.0) -> None:
        """Limit REST request weight per window (429 + ``Retry-After`` beyond it); None switches it off."""
        self._limiter.configure(weight_limit, window_s)

    def ban(self, seconds: float) -> None:
        """Answer every REST request 418 (IP banned, ``Retry-After``) for ``seconds``; 0 lifts the ban."""
        self._limiter.ban(seconds)

    def connection_lifetime(self, seconds: float | None) -> None:
        """Close every connection once it has been open ``seconds`` (1001, as at Binance's 24 h); None = never.

        Must be called on the exchange's event loop (the control endpoint is)."""
        if seconds is not None and seconds <= 0:
            raise ValueError(f"lifetime seconds must be positive, got {seconds}")
        if self._lifetime_task is not None:
            self._lifetime_task.cancel()
            self._lifetime_task = None
        if seconds is not None:
            self._lifetime_task = asyncio.get_running_loop().create_task(self._expire(seconds))

    async def _expire(self, seconds: float) -> None:
        hub = self._hub
        first_seen: dict[int, float] = {}
        while True:
            now = hub.monotonic()
            for conn in list(hub.connections):
                opened = first_seen.setdefault(id(conn), now)
                if now - opened >= seconds and not conn.closing:
                    with contextlib.suppress(Exception):
                        hub.spawn(conn.close(1001, "connection lifetime reached"))
            alive = {id(conn) for conn in hub.connections}
            first_seen = {key: value for key, value in first_seen.items() if key in alive}
            await asyncio.sleep(min(0.1, seconds / 4))
