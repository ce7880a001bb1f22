"""Pure kline core: interval calendars, trade and kline models, the incremental KlineBook, a reference oracle.

Nothing in this package does I/O (except the explicit CSV readers in ``reference``) or touches asyncio; time
is always passed in by the caller.
"""

from services.core.book import KlineBook, KlineBooks, RejectedTrade
from services.core.intervals import (
    DEFAULT_INTERVALS,
    INTERVALS,
    close_time,
    interval_ms,
    iter_opens,
    next_open,
    open_time,
    validate_interval,
)
from services.core.models import AggTrade, InvalidInput, Kline, parse_agg_trade
from services.core.reference import read_aggtrades_csv, read_klines_csv, reference_klines

__all__ = [
    "DEFAULT_INTERVALS",
    "INTERVALS",
    "AggTrade",
    "InvalidInput",
    "Kline",
    "KlineBook",
    "KlineBooks",
    "RejectedTrade",
    "close_time",
    "interval_ms",
    "iter_opens",
    "next_open",
    "open_time",
    "parse_agg_trade",
    "read_aggtrades_csv",
    "read_klines_csv",
    "reference_klines",
    "validate_interval",
]
