"""The replay exchange: one aiohttp app serving Binance's market-stream WebSocket and REST protocol on one port.

Composition root only: it loads the tape, builds the playback clock, the stream hub, the publisher, the REST
API and the control endpoints, and wires them together. ``start()`` binds the port and starts publishing (per
``autostart``); ``stop()``:

1. stops the publisher (no trade is published after it returns);
2. closes every WebSocket with 1001 (going away), sending what was already queued unless stalled;
3. stops the HTTP server and releases the port.

It does not wait for clients to read anything and it is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from aiohttp import web

from services.core.models import AggTrade
from services.replay.clock import PlaybackClock
from services.replay.config import ReplayConfig
from services.replay.control import add_control_routes
from services.replay.faults import Faults, FaultState
from services.replay.publisher import Publisher
from services.replay.rest import RestApi, WeightLimiter
from services.replay.streams import StreamHub
from services.replay.tape import MarketTape, SymbolTape, load_tape

log = logging.getLogger("services.replay")


class ReplayExchange:
    """A local Binance for one venue (see :mod:`services.replay` for the whole public API)."""

    def __init__(
        self,
        config: ReplayConfig | None = None,
        *,
        trades: Mapping[str, Sequence[AggTrade]] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        """``trades`` (symbol → trades) replaces the configured feed with a scripted one; ``monotonic`` is the
        real-time source in seconds (default: the event loop's clock)."""
        self.config = config if config is not None else ReplayConfig()
        self._scripted = {s: list(ts) for s, ts in trades.items()} if trades is not None else None
        self._monotonic = monotonic
        self._tape: MarketTape | None = None
        self._clock: PlaybackClock | None = None
        self._publisher: Publisher | None = None
        self._hub: StreamHub | None = None
        self._faults: Faults | None = None
        self._rest: RestApi | None = None
        self._runner: web.AppRunner | None = None
        self._publisher_task: asyncio.Task[None] | None = None
        self._port = 0
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the feed, bind the port and start publishing according to ``autostart``."""
        if self._runner is not None:
            raise RuntimeError("the exchange is already started")
        config = self.config
        if self._scripted is not None:
            scripted = self._scripted
            times = [t.T for ts in scripted.values() for t in ts] or [0]
            tape = MarketTape(scripted, venue=config.venue, start_ms=min(times), end_ms=max(times))
        else:
            tape = await asyncio.to_thread(load_tape, config)
        loop = asyncio.get_running_loop()
        monotonic = self._monotonic or loop.time
        clock = PlaybackClock(monotonic, start_ms=tape.start_ms, end_ms=tape.end_ms, speed=config.speed)
        state = FaultState()
        limiter = WeightLimiter(monotonic, config.rest_weight_limit, config.rest_weight_window_s)
        hub = StreamHub(config, tape, monotonic=monotonic, on_first_subscription=self._on_first_subscription)
        publisher = Publisher(tape, clock, hub, state)
        self._tape, self._clock, self._hub, self._publisher = tape, clock, hub, publisher
        self._faults = Faults(
            tape=tape, state=state, hub=hub, publisher=publisher, limiter=limiter, market_time_ms=clock.now_ms
        )
        self._rest = RestApi(tape, clock, config.venue, limiter)

        app = web.Application()
        self._rest.add_routes(app)
        if config.venue == "spot":
            self._add_stream_routes(app, "", silent=False)
        else:
            self._add_stream_routes(app, "/market", silent=False)
            self._add_stream_routes(app, "", silent=True)  # unrouted futures paths: accepted, silent
        add_control_routes(app, self, self._faults)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._publisher_task = asyncio.create_task(publisher.run(), name="replay-publisher")
        self._publisher_task.add_done_callback(self._publisher_done)
        if config.autostart == "immediately":
            publisher.start()
        log.info("replay exchange serving %s on %s (%d trades)", config.venue, self.rest_url, len(tape))

    def _add_stream_routes(self, app: web.Application, prefix: str, *, silent: bool) -> None:
        assert self._hub is not None
        handler = self._hub.handler(silent=silent)
        app.router.add_get(f"{prefix}/stream", handler)
        app.router.add_get(f"{prefix}/ws", handler)
        app.router.add_get(f"{prefix}/ws/{{streams:.+}}", handler)

    def _on_first_subscription(self) -> None:
        if self.config.autostart in ("on_subscribe", "on_all_subscribed") and self._publisher is not None:
            self._publisher.start()

    @staticmethod
    def _publisher_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("replay publisher failed", exc_info=task.exception())

    async def stop(self) -> None:
        """Stop publishing, close every connection, release the port (see the module docstring)."""
        if self._stopped or self._runner is None:
            self._stopped = True
            return
        self._stopped = True
        if self._publisher_task is not None:
            self._publisher_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher_task
        if self._hub is not None:
            await self._hub.close_all()
        await self._runner.cleanup()

    async def __aenter__(self) -> ReplayExchange:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ addresses
    @property
    def port(self) -> int:
        """The bound TCP port (the chosen one when the config asked for 0)."""
        self._require_started()
        return self._port

    @property
    def ws_url(self) -> str:
        """WebSocket base, like ``wss://stream.binance.com:9443``: add ``/stream?...`` (futures ``/market/...``)."""
        return f"ws://{self._host}:{self.port}"

    @property
    def rest_url(self) -> str:
        """REST base, like ``https://api.binance.com``: add ``/api/v3/...`` (futures ``/fapi/v1/...``)."""
        return f"http://{self._host}:{self.port}"

    @property
    def control_url(self) -> str:
        """Base of the fault-injection and status endpoints."""
        return f"{self.rest_url}/_control"

    def stream_url(self, symbols: Sequence[str], *, combined: bool = True) -> str:
        """The venue's (routed) URL for the aggTrade streams of ``symbols``."""
        prefix = "/market" if self.config.venue == "usdm" else ""
        names = "/".join(f"{s.lower()}@aggTrade" for s in symbols)
        if combined:
            return f"{self.ws_url}{prefix}/stream?streams={names}"
        return f"{self.ws_url}{prefix}/ws/{names}" if names else f"{self.ws_url}{prefix}/ws"

    @property
    def _host(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - naming the wildcard, not binding it
            return "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    # ------------------------------------------------------------------ state
    def _require_started(self) -> None:
        if self._runner is None:
            raise RuntimeError("the exchange is not started; use `async with ReplayExchange(...)` or `await start()`")

    def _symbol_tape(self, symbol: str) -> SymbolTape:
        self._require_started()
        assert self._tape is not None
        tape = self._tape.get(symbol.upper())
        if tape is None:
            raise KeyError(f"unknown symbol {symbol!r}; this exchange lists {', '.join(self._tape.symbols)}")
        return tape

    @property
    def faults(self) -> Faults:
        """Fault injection (:class:`~services.replay.faults.Faults`)."""
        self._require_started()
        assert self._faults is not None
        return self._faults

    @property
    def symbols(self) -> tuple[str, ...]:
        """The listed symbols, in feed order."""
        self._require_started()
        assert self._tape is not None
        return tuple(self._tape.symbols)

    def market_time_ms(self) -> int:
        """Current market time (what ``/api/v3/time`` answers)."""
        self._require_started()
        assert self._clock is not None
        return self._clock.now_ms()

    def trades(self, symbol: str) -> list[AggTrade]:
        """Every trade of ``symbol`` the feed holds, published or not, ordered by ``a``."""
        return list(self._symbol_tape(symbol).trades)

    def published_trades(self, symbol: str) -> list[AggTrade]:
        """The trades of ``symbol`` published so far (exactly what REST ``aggTrades`` can return)."""
        return self._symbol_tape(symbol).published_trades()

    def set_status(self, symbol: str, status: str = "TRADING") -> None:
        """The ``exchangeInfo`` status of ``symbol`` from now on (``BREAK``: halted or delisted; the feed itself
        goes on, as a test of what a client does when the listing changes under a running stream)."""
        self._symbol_tape(symbol)  # an unknown symbol is an error
        assert self._rest is not None
        if status == "TRADING":
            self._rest.statuses.pop(symbol, None)
        else:
            self._rest.statuses[symbol] = status

    def start_feed(self) -> None:
        """Start market time now (for ``autostart="never"``, or to not wait for a subscriber)."""
        self._require_started()
        assert self._publisher is not None
        self._publisher.resume()

    @property
    def exhausted(self) -> bool:
        """Every trade is published and market time has reached the feed's end."""
        return self._publisher is not None and self._publisher.exhausted.is_set()

    async def wait_exhausted(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a convenience for tests
        """Wait until :attr:`exhausted`; raises ``TimeoutError`` after ``timeout`` seconds."""
        self._require_started()
        assert self._publisher is not None
        async with asyncio.timeout(timeout):
            await self._publisher.exhausted.wait()

    def status(self) -> dict[str, Any]:
        """What ``/_control/status`` answers."""
        self._require_started()
        assert self._tape is not None and self._clock is not None and self._hub is not None
        clock = self._clock
        return {
            "venue": self.config.venue,
            "speed": self.config.speed,
            "market_time_ms": clock.now_ms(),
            "started": clock.started,
            "running": clock.running,
            "exhausted": self.exhausted,
            "connections": len(self._hub.connections),
            "symbols": {
                tape.symbol: {
                    "last_id": tape.last_published_id,
                    "published": tape.published,
                    "total": len(tape.trades),
                    "exhausted": tape.exhausted,
                }
                for tape in self._tape.by_index
            },
        }
