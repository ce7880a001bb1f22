"""Binance market-data REST endpoints over the trades published so far.

Spot serves ``/api/v3/...``, USD-M futures ``/fapi/v1/...``:

* ``aggTrades?symbol=&fromId=&startTime=&endTime=&limit=`` — default limit 500, max 1000 (larger is clamped).
  ``fromId`` pages by id; ``startTime``/``endTime`` select by ``T`` (inclusive; a window over one hour is error
  -1127; combining ``fromId`` with a time is error -1128, so clients stay portable); only ``endTime``: the newest
  trades up to it; nothing: the newest trades.
* ``klines?symbol=&interval=&startTime=&endTime=&limit=`` — default 500, max 1000 (futures 1500). Rows of
  klines with ``startTime <= t <= endTime``, computed with the reference oracle from the published trades: the
  closed ones plus the one in progress at market time, empty intervals filled with the previous close like
  Binance. Without ``startTime``, the newest ``limit`` klines up to ``endTime`` (or now).
* ``exchangeInfo`` (every symbol ``TRADING``, unless :attr:`RestApi.statuses` says otherwise: a symbol halted
  or delisted for a test, e.g. ``BREAK``), ``time`` (``serverTime`` = market time), ``ping``.

Errors are Binance's JSON with HTTP 400: ``{"code":-1121,"msg":"Invalid symbol."}``, -1120 invalid interval,
-1100 illegal characters, -1102 missing parameter, -1023 start after end.

Optional request-weight limiting (off unless configured): each request costs Binance's weight, reported in
``X-MBX-USED-WEIGHT-1M``; beyond the limit the answer is 429 with ``Retry-After`` (seconds to the next window)
and code -1003. A ban (:meth:`WeightLimiter.ban`, the fault API's ``ban``) answers every request 418 with
``Retry-After`` (seconds until it ends) and code -1003 until it ends, as Binance does after repeated 429s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from aiohttp import web

from services.core.intervals import close_time, open_time, validate_interval
from services.core.models import Kline
from services.core.reference import reference_klines
from services.replay.clock import PlaybackClock
from services.replay.config import Venue
from services.replay.tape import MarketTape, SymbolTape, rest_payload

_SYMBOL_PARAM = re.compile(r"^[A-Z0-9\-_.]{1,20}$")
_INT_PARAM = re.compile(r"^[0-9]{1,20}$")
HOUR_MS = 3_600_000
_EIGHT_PLACES = Decimal("0.00000001")
_DECIMAL_COLUMNS = (1, 2, 3, 4, 5, 7, 9, 10)  # o h l c v q V Q of a REST kline row


class RestError(Exception):
    """A request Binance would reject: answered as ``{"code":..,"msg":..}`` with ``status``."""

    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.status = status


class WeightLimiter:
    """Request weight per fixed window of real time; a limit of None means unlimited."""

    def __init__(self, monotonic: Callable[[], float], limit: int | None, window_s: float) -> None:
        self._monotonic = monotonic
        self.limit = limit
        self.window_s = window_s
        self._window = -1
        self.used = 0
        self.banned_until = 0.0

    def configure(self, limit: int | None, window_s: float = 60.0) -> None:
        """Change the limit (None = off) and window; the usage count starts again."""
        if limit is not None and limit < 1:
            raise ValueError(f"weight limit must be >= 1 or None, got {limit}")
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.limit, self.window_s, self._window, self.used = limit, window_s, -1, 0

    def ban(self, seconds: float) -> None:
        """Answer every request 418 for ``seconds`` from now (0 lifts a ban)."""
        if seconds < 0:
            raise ValueError(f"ban seconds must be >= 0, got {seconds}")
        self.banned_until = self._monotonic() + seconds

    def banned_for(self) -> float | None:
        """Seconds until the ban ends, or None when there is none."""
        remaining = self.banned_until - self._monotonic()
        return remaining if remaining > 0 else None

    def charge(self, weight: int) -> float | None:
        """Count ``weight``; return None if allowed, else the seconds until the window resets."""
        now = self._monotonic()
        window = int(now // self.window_s)
        if window != self._window:
            self._window, self.used = window, 0
        if self.limit is not None and self.used + weight > self.limit:
            return (window + 1) * self.window_s - now
        self.used += weight
        return None


def _futures_klines_weight(limit: int) -> int:
    return 1 if limit < 100 else 2 if limit < 500 else 5 if limit <= 1000 else 10


class RestApi:
    """The REST handlers of one venue."""

    def __init__(self, tape: MarketTape, clock: PlaybackClock, venue: Venue, limiter: WeightLimiter) -> None:
        self.tape = tape
        self.clock = clock
        self.venue = venue
        self.limiter = limiter
        self.prefix = "/api/v3" if venue == "spot" else "/fapi/v1"
        self.klines_max = 1000 if venue == "spot" else 1500
        #: ``exchangeInfo`` status per symbol, where it is not ``TRADING`` (:meth:`ReplayExchange.set_status
        #: <services.replay.exchange.ReplayExchange.set_status>`).
        self.statuses: dict[str, str] = {}

    def add_routes(self, app: web.Application) -> None:
        """Register the venue's endpoints."""
        spot = self.venue == "spot"
        endpoints: list[tuple[str, Callable[[web.Request], Awaitable[web.Response]], Callable[[int], int]]] = [
            ("aggTrades", self.agg_trades, lambda _: 4 if spot else 20),
            ("klines", self.klines, (lambda _: 2) if spot else _futures_klines_weight),
            ("exchangeInfo", self.exchange_info, lambda _: 20 if spot else 1),
            ("time", self.time, lambda _: 1),
            ("ping", self.ping, lambda _: 1),
        ]
        for name, handler, weight in endpoints:
            app.router.add_get(f"{self.prefix}/{name}", self._guard(handler, weight))

    def _guard(
        self,
        handler: Callable[[web.Request], Awaitable[web.Response]],
        weight: Callable[[int], int],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def guarded(request: web.Request) -> web.Response:
            limit_text = request.query.get("limit", "")
            limit = int(limit_text) if _INT_PARAM.match(limit_text) else 500
            banned = self.limiter.banned_for()
            if banned is not None:
                until = self.clock.now_ms() + int(banned * 1000)
                body = {
                    "code": -1003,
                    "msg": f"Way too much request weight used; IP banned until {until}. Please use WebSocket Streams "
                    "for live updates to avoid bans.",
                }
                return web.json_response(body, status=418, headers={"Retry-After": str(max(1, math.ceil(banned)))})
            retry_after = self.limiter.charge(weight(limit))
            headers = {"X-MBX-USED-WEIGHT-1M": str(self.limiter.used)}
            if retry_after is not None:
                headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
                body = {
                    "code": -1003,
                    "msg": f"Too much request weight used; current limit is {self.limiter.limit} request weight "
                    f"per {self.limiter.window_s:g} s. Please use WebSocket Streams for live updates.",
                }
                return web.json_response(body, status=429, headers=headers)
            try:
                response = await handler(request)
            except RestError as exc:
                return web.json_response({"code": exc.code, "msg": exc.msg}, status=exc.status, headers=headers)
            response.headers.update(headers)
            return response

        return guarded

    # ------------------------------------------------------------------ parameters
    def _symbol(self, request: web.Request) -> SymbolTape:
        symbol = request.query.get("symbol", "")
        if not symbol:
            raise RestError(-1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
        if not _SYMBOL_PARAM.match(symbol):
            raise RestError(
                -1100, "Illegal characters found in parameter 'symbol'; legal range is '^[A-Z0-9-_.]{1,20}$'."
            )
        tape = self.tape.get(symbol)
        if tape is None:
            raise RestError(-1121, "Invalid symbol.")
        return tape

    @staticmethod
    def _int(request: web.Request, name: str) -> int | None:
        text = request.query.get(name)
        if text is None or text == "":
            return None
        if not _INT_PARAM.match(text):
            raise RestError(-1100, f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.")
        return int(text)

    def _limit(self, request: web.Request, maximum: int) -> int:
        limit = self._int(request, "limit")
        if limit is None:
            return 500
        if limit < 1:
            raise RestError(-1100, f"Illegal characters found in parameter 'limit'; legal range is '1..{maximum}'.")
        return min(limit, maximum)

    # ------------------------------------------------------------------ endpoints
    async def agg_trades(self, request: web.Request) -> web.Response:
        """``aggTrades``: see the module docstring for the selection rules."""
        tape = self._symbol(request)
        limit = self._limit(request, 1000)
        from_id = self._int(request, "fromId")
        start = self._int(request, "startTime")
        end = self._int(request, "endTime")
        published = tape.published
        if from_id is not None:
            if start is not None or end is not None:
                raise RestError(-1128, "Combination of optional parameters invalid.")
            lo = tape.index_from_id(from_id)
            hi = min(lo + limit, published)
        elif start is not None:
            if end is not None:
                if start > end:
                    raise RestError(-1023, "Start time is greater than end time.")
                if end - start > HOUR_MS:
                    raise RestError(-1127, "More than 1 hours between startTime and endTime.")
            lo = tape.index_from_time(start, published)
            bound = tape.index_after_time(end, published) if end is not None else published
            hi = min(lo + limit, bound)
        elif end is not None:
            hi = tape.index_after_time(end, published)
            lo = max(0, hi - limit)
        else:
            hi = published
            lo = max(0, hi - limit)
        body = "[" + ",".join(rest_payload(t, self.venue) for t in tape.trades[lo:hi]) + "]"
        return web.Response(text=body, content_type="application/json")

    def kline_rows(
        self, tape: SymbolTape, interval: str, start: int | None, end: int | None, limit: int
    ) -> list[list[Any]]:
        """The REST rows of ``klines`` (shared with tests through the exchange)."""
        published = tape.published
        if published == 0:
            return []
        now = self.clock.now_ms()
        first_open = open_time(interval, tape.times[0])
        current_open = open_time(interval, max(now, tape.times[published - 1]))
        opens: list[int] = []
        if start is not None:
            t = open_time(interval, max(start, first_open))
            if t < start:
                t = close_time(interval, t) + 1
            last = current_open if end is None else min(end, current_open)
            while t <= last and len(opens) < limit:
                opens.append(t)
                t = close_time(interval, t) + 1
        else:
            t = open_time(interval, current_open if end is None else min(end, current_open))
            while t >= first_open and len(opens) < limit:
                opens.append(t)
                t = open_time(interval, t - 1)
            opens.reverse()
        if not opens:
            return []
        lo = tape.index_from_time(opens[0], published)
        hi = tape.index_after_time(close_time(interval, opens[-1]), published)
        # One trade before the range carries the previous close into leading empty klines.
        computed = {k.t: k for k in reference_klines(tape.trades[max(0, lo - 1) : hi], interval, fill_empty=True)}
        rows: list[list[Any]] = []
        previous: Kline | None = None
        for t in opens:
            kline = computed.get(t)
            if kline is None:
                if previous is None:
                    before = [k for k in computed.values() if k.t < t]
                    previous = max(before, key=lambda k: k.t) if before else None
                if previous is None:
                    continue
                kline = Kline.empty(tape.symbol, interval, t, previous.c)
            rows.append(self._format_row(kline.to_rest_row()))
            previous = kline
        return rows

    def _format_row(self, row: list[Any]) -> list[Any]:
        """Spot prints every decimal with 8 places (``"87648.21000000"``), when that is exact; futures as computed."""
        if self.venue != "spot":
            return row
        out = list(row)
        for index in _DECIMAL_COLUMNS:
            number = Decimal(row[index])
            eight = number.quantize(_EIGHT_PLACES)
            if eight == number:
                out[index] = f"{eight:f}"
        return out

    async def klines(self, request: web.Request) -> web.Response:
        """``klines``: see the module docstring."""
        tape = self._symbol(request)
        interval = request.query.get("interval", "")
        if not interval:
            raise RestError(-1102, "Mandatory parameter 'interval' was not sent, was empty/null, or malformed.")
        try:
            validate_interval(interval)
        except ValueError:
            raise RestError(-1120, "Invalid interval.") from None
        if interval == "1s" and self.venue == "usdm":
            raise RestError(-1120, "Invalid interval.")
        limit = self._limit(request, self.klines_max)
        start = self._int(request, "startTime")
        end = self._int(request, "endTime")
        if start is not None and end is not None and start > end:
            raise RestError(-1023, "Start time is greater than end time.")
        return web.json_response(self.kline_rows(tape, interval, start, end, limit))

    async def exchange_info(self, request: web.Request) -> web.Response:
        """``exchangeInfo``: every listed symbol, status ``TRADING`` or its :attr:`statuses` entry (``?symbol=``
        filters)."""
        wanted = request.query.get("symbol")
        symbols = []
        for tape in self.tape.by_index:
            if wanted is not None and tape.symbol != wanted:
                continue
            entry: dict[str, Any] = {
                "symbol": tape.symbol,
                "status": self.statuses.get(tape.symbol, "TRADING"),
                "baseAsset": tape.base_asset,
                "quoteAsset": tape.quote_asset,
            }
            if self.venue == "usdm":
                entry["contractType"] = "PERPETUAL"
            symbols.append(entry)
        if wanted is not None and not symbols:
            raise RestError(-1121, "Invalid symbol.")
        return web.json_response(
            {
                "timezone": "UTC",
                "serverTime": self.clock.now_ms(),
                "rateLimits": [
                    {
                        "rateLimitType": "REQUEST_WEIGHT",
                        "interval": "MINUTE",
                        "intervalNum": 1,
                        "limit": self.limiter.limit or 6000,
                    }
                ],
                "exchangeFilters": [],
                "symbols": symbols,
            }
        )

    async def time(self, request: web.Request) -> web.Response:
        """``time``: ``{"serverTime": market time}``."""
        return web.json_response({"serverTime": self.clock.now_ms()})

    async def ping(self, request: web.Request) -> web.Response:
        """``ping``: ``{}``."""
        return web.json_response({})
