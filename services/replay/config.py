"""Configuration of the replay exchange: what it replays, how fast, and how strictly it behaves like Binance.

One frozen :class:`ReplayConfig` per exchange. Validation errors name the field (pydantic), and the command line
(:mod:`services.replay.__main__`) builds the same object, so a test and a user run exactly the same thing.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Venue = Literal["spot", "usdm"]
"""``spot``: ``/stream``, ``/ws``, ``/api/v3``; ``usdm`` (futures): ``/market/stream``, ``/market/ws``, ``/fapi/v1``."""

Autostart = Literal["on_subscribe", "on_all_subscribed", "immediately", "never"]
"""When market time starts: at the first aggTrade subscription, once every listed symbol's aggTrade stream is
subscribed (a client that subscribes in steps, over several connections, misses nothing at ``speed=0``), at
once, or only on ``resume``."""

_SYMBOL = re.compile(r"^[A-Z0-9]{2,30}$")
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """``"15m"`` → 900000. Units: ms, s, m (minutes), h, d."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"duration {text!r} must look like 90s, 15m, 2h or 1d")
    return int(match.group(1)) * _DURATION_MS[match.group(2)]


def parse_utc_ms(text: str) -> int:
    """``"2026-01-01T00:00:00Z"`` (or a bare integer of epoch milliseconds) → epoch milliseconds."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def _check_symbol(symbol: str) -> str:
    if not _SYMBOL.match(symbol):
        raise ValueError(f"symbol {symbol!r} must be 2-30 upper-case letters or digits, like BTCUSDT")
    return symbol


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GeneratorFeed(_Frozen):
    """A deterministic synthetic market: same seed, same trades (see :mod:`services.replay.generator`)."""

    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT")
    seed: int = 1
    start_ms: int = Field(default=1_767_225_600_000, ge=0)  # 2026-01-01T00:00:00Z
    duration_ms: int = Field(default=15 * 60_000, gt=0)
    #: Zipf activity (:class:`~services.replay.generator.ZipfActivity`): the k-th symbol trades ``1/k**zipf`` as
    #: often as the first, which trades ``zipf_top_orders_per_s`` taker orders a second; None: each symbol's
    #: own profile (majors like Binance, other names from their hash).
    zipf: float | None = Field(default=None, gt=0)
    zipf_top_orders_per_s: float = Field(default=20.0, gt=0)

    @field_validator("symbols")
    @classmethod
    def _symbols_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one symbol is needed")
        if len(set(value)) != len(value):
            raise ValueError(f"symbols repeat: {', '.join(value)}")
        return tuple(_check_symbol(s) for s in value)


class FileFeed(_Frozen):
    """One recorded aggTrades CSV (data.binance.vision layout) replayed as ``symbol``."""

    path: Path
    symbol: str

    @field_validator("symbol")
    @classmethod
    def _symbol_valid(cls, value: str) -> str:
        return _check_symbol(value)


class ReplayConfig(_Frozen):
    """Everything a :class:`~services.replay.ReplayExchange` can be told."""

    feed: GeneratorFeed | tuple[FileFeed, ...] = GeneratorFeed()
    venue: Venue = "spot"
    speed: float = Field(default=1.0, ge=0)  # market ms per real ms; 0 = as fast as possible
    autostart: Autostart = "on_subscribe"
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, lt=65536)  # 0 = pick a free port
    ping_interval_s: float = Field(default=20.0, gt=0)
    pong_timeout_s: float = Field(default=60.0, gt=0)
    max_connection_age_s: float | None = Field(default=None, gt=0)  # Binance: 86400 (24 h); None = forever
    max_streams_per_connection: int = Field(default=1024, ge=1)
    # Binance: 5 incoming messages/s on spot, 10 on USD-M futures; None = the venue's value.
    max_control_messages_per_s: int | None = Field(default=None, ge=1)
    # REST request-weight limit per window; None = no limit (the default). Exceeding it answers 429 + Retry-After.
    rest_weight_limit: int | None = Field(default=None, ge=1)
    rest_weight_window_s: float = Field(default=60.0, gt=0)
    server_shutdown_close_after_s: float = Field(default=1.0, ge=0)
    # Real-time mode: a connection that falls this many frames behind is closed (Binance drops slow consumers).
    # Fast mode (speed=0) instead waits for slow connections, so a client that keeps reading loses nothing.
    max_pending_frames: int = Field(default=2_000_000, ge=1)

    @field_validator("feed")
    @classmethod
    def _files_distinct(cls, value: GeneratorFeed | tuple[FileFeed, ...]) -> GeneratorFeed | tuple[FileFeed, ...]:
        if isinstance(value, tuple):
            if not value:
                raise ValueError("at least one file feed is needed")
            symbols = [f.symbol for f in value]
            if len(set(symbols)) != len(symbols):
                raise ValueError(f"each file needs its own symbol, got {', '.join(symbols)}")
        return value

    @property
    def control_messages_per_s(self) -> int:
        """The incoming-message limit per connection actually enforced."""
        if self.max_control_messages_per_s is not None:
            return self.max_control_messages_per_s
        return 5 if self.venue == "spot" else 10

    @property
    def symbols(self) -> tuple[str, ...]:
        """The symbols this exchange lists, in feed order."""
        if isinstance(self.feed, GeneratorFeed):
            return self.feed.symbols
        return tuple(f.symbol for f in self.feed)
