"""Recent finalized klines for a new subscriber, read from ClickHouse through the shared read path.

Where history comes from (:func:`history_source`):

* ``"clickhouse"`` when ``gateway.history`` is ``"on"``, or ``"auto"`` and ClickHouse is a server: the table
  ``klines_finalized`` read with ``FINAL``, so a corrected kline shows its latest version;
* ``"memory"`` otherwise, when ``gateway.recent_klines`` > 0: the last finalized klines the gateway itself read
  from the topic (since its start, plus the read-back);
* ``"none"`` when neither is allowed.

Why ``"auto"`` does not open an embedded chDB directory: one chDB directory can be open in one process at a
time, and in the embedded setup (``klines run``) the writers' process owns it. A gateway that opened it would
fail, or, started first, would lock the writers out of their own storage. ``"on"`` is for an embedded
directory nobody else has open (a demo on stored data, a test).

clickhouse-connect is synchronous: :meth:`ClickHouseHistory.fetch` runs in a worker thread.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any, Literal

from services.core.models import Kline
from services.gateway.protocol import Stream
from services.shared import clickhouse
from services.shared.settings import ClickHouseSettings, Settings

log = logging.getLogger(__name__)

HistorySource = Literal["clickhouse", "memory", "none"]

_COLUMNS = (
    "open_time, close_time, first_trade_id, last_trade_id, open, high, low, close, volume, quote_volume, "
    "trade_count, taker_buy_volume, taker_buy_quote_volume, version, source"
)


def history_source(settings: Settings) -> HistorySource:
    mode = settings.gateway.history
    if mode == "on" or (mode == "auto" and not settings.clickhouse.embedded):
        return "clickhouse"
    return "memory" if settings.gateway.recent_klines > 0 else "none"


class ClickHouseHistory:
    """Reads the last N finalized klines of one stream; connects on first use (and again after a failure)."""

    def __init__(self, settings: ClickHouseSettings) -> None:
        self.settings = settings
        self._client: Any = None

    def fetch(self, stream: Stream, limit: int) -> list[Kline]:
        """The last ``limit`` finalized klines of ``stream``, oldest first. Raises on a ClickHouse error."""
        if limit <= 0:
            return []
        if self._client is None:
            self._client = clickhouse.connect(self.settings)
        table = f"{self.settings.database}.{self.settings.finalized_table}"
        try:
            rows = clickhouse.query_rows(
                self._client,
                f"SELECT {_COLUMNS} FROM {table} FINAL WHERE symbol = {{s:String}} AND interval = {{i:String}} "
                "ORDER BY open_time DESC LIMIT {n:UInt32}",
                {"s": stream.symbol, "i": stream.interval, "n": limit},
            )
        except Exception:
            self.close()  # reconnect next time: a server restart must not break history for good
            raise
        return [_kline(stream, row) for row in reversed(rows)]

    def close(self) -> None:
        if self._client is not None:
            self._client = None
            clickhouse.close(self.settings)


def _trim(value: Decimal) -> Decimal:
    # Decimal(38, 18) comes back with 18 places; the topic carries the trade's own precision. Same number.
    return value.normalize() if value else Decimal(0)


def _kline(stream: Stream, row: tuple[Any, ...]) -> Kline:
    (t, close_t, first, last, o, h, low, c, v, q, n, buy_v, buy_q, version, source) = row
    return Kline(
        stream.symbol,
        stream.interval,
        int(t),
        int(close_t),
        int(first),
        int(last),
        _trim(o),
        _trim(h),
        _trim(low),
        _trim(c),
        _trim(v),
        int(n),
        True,
        _trim(q),
        _trim(buy_v),
        _trim(buy_q),
        int(version),
        str(source),
    )
