"""Binance market-data REST for ingest: ``aggTrades`` pages for backfill, ``exchangeInfo`` for discovery and
``time`` for the exchange's clock (:mod:`services.ingest.exchange_time`).

Rate limits are the exchange's, per IP, in request weight per minute (spot 6000, USD-M 2400; ``aggTrades``
costs 4 on spot and 20 on USD-M, ``exchangeInfo`` 20 and 1). This client:

* spends at most ``budget_fraction`` of the venue's limit in any rolling minute (other clients may share the
  IP), waiting before a request that would exceed it;
* reads ``X-MBX-USED-WEIGHT-1M`` and pauses while the server-side count is above that budget;
* on **429** pauses every request for ``Retry-After`` seconds and raises :class:`RateLimited` (the caller
  retries; a 429 is a warning, not a failure);
* on **418** (the IP is banned) raises :class:`Banned` and refuses every further request until the ban ends,
  without contacting the exchange: repeating requests during a ban lengthens it. Backfill then publishes
  gaps instead of waiting.

Time is read through the injected ``clock`` (monotonic seconds).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import aiohttp

from services.core.models import AggTrade, InvalidInput, parse_agg_trade

Venue = Literal["spot", "usdm"]

WEIGHT_LIMIT_PER_MINUTE: Final[dict[str, int]] = {"spot": 6000, "usdm": 2400}
AGG_TRADES_WEIGHT: Final[dict[str, int]] = {"spot": 4, "usdm": 20}
EXCHANGE_INFO_WEIGHT: Final[dict[str, int]] = {"spot": 20, "usdm": 1}
TIME_WEIGHT: Final = 1
PREFIX: Final[dict[str, str]] = {"spot": "/api/v3", "usdm": "/fapi/v1"}
MAX_AGG_TRADES_LIMIT: Final = 1000
DEFAULT_BAN_S: Final = 120.0


class RestError(Exception):
    """A request failed (network, status, body); the message says which request and why."""


class RateLimited(RestError):
    """429: slow down; every request waits ``retry_after_s`` first."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Banned(RestError):
    """418: the IP is banned until ``until`` (clock seconds); no request is sent before then."""

    def __init__(self, message: str, until: float) -> None:
        super().__init__(message)
        self.until = until


@dataclass(frozen=True, slots=True)
class SymbolInfo:
    symbol: str
    status: str
    quote_asset: str


class WeightBudget:
    """Request weight spent in the last 60 s, bounded by ``limit``; plus a pause the server may impose."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self.limit = max(1, limit)
        self._clock = clock
        self._spent: deque[tuple[float, int]] = deque()
        self._total = 0
        self.paused_until = 0.0

    def _expire(self, now: float) -> None:
        while self._spent and self._spent[0][0] <= now - 60.0:
            self._total -= self._spent.popleft()[1]

    def delay_for(self, weight: int) -> float:
        """Seconds to wait before spending ``weight`` (0 = now)."""
        now = self._clock()
        self._expire(now)
        wait = max(0.0, self.paused_until - now)
        if self._spent and self._total + weight > self.limit:
            wait = max(wait, self._spent[0][0] + 60.0 - now)
        return wait

    def spend(self, weight: int) -> None:
        now = self._clock()
        self._spent.append((now, weight))
        self._total += weight

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self._clock() + seconds)

    def observe_used(self, used: int) -> None:
        """The exchange's own count for this IP: above our budget, someone else spends too; back off."""
        if used >= self.limit:
            self.pause(1.0)


class ExchangeRest:
    """``aggTrades``, ``exchangeInfo`` and ``time`` for one venue, rate-limit aware (see the module docstring)."""

    def __init__(
        self,
        rest_url: str,
        venue: Venue,
        *,
        clock: Callable[[], float],
        timeout_s: float = 10.0,
        budget_fraction: float = 0.5,
    ) -> None:
        if not 0 < budget_fraction <= 1:
            raise ValueError(f"budget_fraction must be in (0, 1], got {budget_fraction}")
        self.base = rest_url.rstrip("/")
        self.venue = venue
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.budget = WeightBudget(int(WEIGHT_LIMIT_PER_MINUTE[venue] * budget_fraction), clock)
        self.banned_until = 0.0
        self.requests = 0
        self.rate_limited = 0
        self.bans = 0
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, raise_for_status=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def banned(self) -> bool:
        return self._clock() < self.banned_until

    async def agg_trades(self, symbol: str, from_id: int, limit: int = MAX_AGG_TRADES_LIMIT) -> list[AggTrade]:
        """Trades of ``symbol`` with ``a >= from_id``, at most ``limit``, validated, ordered by ``a``."""
        limit = max(1, min(limit, MAX_AGG_TRADES_LIMIT))
        params = {"symbol": symbol, "fromId": str(from_id), "limit": str(limit)}
        body = await self._get("aggTrades", params, AGG_TRADES_WEIGHT[self.venue])
        if not isinstance(body, list):
            raise RestError(f"aggTrades {symbol} fromId={from_id}: expected a JSON array, got {type(body).__name__}")
        trades: list[AggTrade] = []
        for index, row in enumerate(body):
            try:
                trades.append(parse_agg_trade(row, symbol))
            except InvalidInput as exc:
                raise RestError(f"aggTrades {symbol} fromId={from_id}: row {index}: {exc.reason}") from None
        trades.sort(key=lambda t: t.a)
        return trades

    async def server_time(self) -> int:
        """The exchange's ``serverTime`` (ms): Binance's clock, or a replay exchange's market time."""
        body = await self._get("time", {}, TIME_WEIGHT)
        value = body.get("serverTime") if isinstance(body, dict) else None
        if type(value) is not int or value < 0:
            raise RestError(f"time: no integer 'serverTime' in the answer ({str(body)[:80]})")
        return value

    async def exchange_info(self) -> list[SymbolInfo]:
        """Every symbol the venue lists, with its status and quote asset."""
        body = await self._get("exchangeInfo", {}, EXCHANGE_INFO_WEIGHT[self.venue])
        rows = body.get("symbols") if isinstance(body, dict) else None
        if not isinstance(rows, list):
            raise RestError("exchangeInfo: no 'symbols' list in the answer")
        out = []
        for row in rows:
            if not isinstance(row, dict):
                continue
            symbol, status, quote = row.get("symbol"), row.get("status"), row.get("quoteAsset")
            if isinstance(symbol, str) and isinstance(status, str) and isinstance(quote, str) and symbol.isalnum():
                out.append(SymbolInfo(symbol.upper(), status, quote.upper()))
        return out

    async def _get(self, endpoint: str, params: dict[str, str], weight: int) -> Any:
        what = f"GET {PREFIX[self.venue]}/{endpoint} {params.get('symbol', '')}".rstrip()
        now = self._clock()
        if now < self.banned_until:
            raise Banned(f"{what}: IP banned (418) for {self.banned_until - now:.0f} s more", self.banned_until)
        delay = self.budget.delay_for(weight)
        if delay > 0:
            await asyncio.sleep(delay)
        if self._session is None:
            await self.start()
        assert self._session is not None
        self.budget.spend(weight)
        self.requests += 1
        url = f"{self.base}{PREFIX[self.venue]}/{endpoint}"
        try:
            async with self._session.get(url, params=params) as resp:
                used = resp.headers.get("X-MBX-USED-WEIGHT-1M", "")
                if used.isdigit():
                    self.budget.observe_used(int(used))
                if resp.status == 429:
                    retry = _retry_after(resp.headers.get("Retry-After"), 1.0)
                    self.budget.pause(retry)
                    self.rate_limited += 1
                    raise RateLimited(f"{what}: 429 too many requests, retry after {retry:g} s", retry)
                if resp.status == 418:
                    retry = _retry_after(resp.headers.get("Retry-After"), DEFAULT_BAN_S)
                    self.banned_until = self._clock() + retry
                    self.bans += 1
                    raise Banned(f"{what}: 418 IP banned for {retry:g} s", self.banned_until)
                text = await resp.text()
                if resp.status != 200:
                    raise RestError(f"{what}: HTTP {resp.status}: {text[:200]}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RestError(f"{what}: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise RestError(f"{what}: answer is not JSON: {exc}") from None


def _retry_after(value: str | None, default: float) -> float:
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        return default
    return seconds if seconds >= 0 else default
