"""The exchange's clock as ingest estimates it: the reference of the trade-time window.

A trade whose ``T`` lies further than ``ingest.max_future_skew_ms`` past the exchange's "now" is not published:
it goes to the dead-letter topic (category ``time``; :mod:`services.ingest.publisher`). "Now" must be the
**exchange's** clock, not this machine's: the replay exchange speaks the same protocol, and its market time
(``serverTime`` of ``GET /api/v3/time`` and ``/fapi/v1/time``) is in the past for a recorded tape and runs far
ahead of real time at ``--speed 0``. For that last reason ingest has no lower bound: by a clock weeks ahead of
the trades still in flight, valid trades would look older than ``kafka.trades_retention_ms`` (the publisher
can take one, ``max_trade_age_ms``; the service passes none). The aggregator applies the retention bound on the
wall clock, where "now" is real time.

1. **Estimate.** ``serverTime`` fetched at start, plus the monotonic time elapsed since the fetch began. The
   estimate is only ever behind the exchange (a request's answer is older than its arrival, and a replay at
   ``--speed 0`` runs faster than real time), so it errs towards calling a real trade "future", never the other
   way round for a hostile one.
2. **Suspect, then confirm.** A trade outside the window by the estimate is only a suspect. It is rejected
   only by an estimate from a ``serverTime`` fetched after the trade arrived (:attr:`ExchangeTime.synced_at`
   at or after the time it was first suspected): until then the publisher holds it (and its symbol's later
   trades, for order) and asks again (:meth:`ExchangeTime.request_sync`: at most one request in flight and
   one per ``min_interval_s``; without the answer within ``give_up_s`` it decides by the estimate it has).
3. **Unknown.** Until a first ``serverTime`` arrives there is no estimate and no window (every trade the
   contract accepts is published); a request is made again at most every ``min_interval_s``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from services.shared.logs import log_event

log = logging.getLogger("services.ingest")

#: At most one ``serverTime`` request per this many seconds (weight 1; the venue allows thousands a minute).
MIN_INTERVAL_S: Final = 0.25
#: A suspect trade waits at most this long for a fresh ``serverTime`` before the estimate decides alone.
GIVE_UP_S: Final = 30.0


class ExchangeTime:
    """The exchange's "now" in milliseconds, estimated (see the module docstring).

    ``fetch_ms`` asks the exchange for its ``serverTime``; ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        fetch_ms: Callable[[], Awaitable[int]],
        *,
        clock: Callable[[], float],
        min_interval_s: float = MIN_INTERVAL_S,
        give_up_s: float = GIVE_UP_S,
    ) -> None:
        self._fetch = fetch_ms
        self._clock = clock
        self.min_interval_s = min_interval_s
        self.give_up_s = give_up_s
        self._server_ms: int | None = None
        self._anchor: float = 0.0
        self._last_attempt: float | None = None
        self._task: asyncio.Task[bool] | None = None
        self.synced_at: float | None = None
        """Monotonic time at which the request behind the current estimate was sent (None: no estimate)."""
        self.syncs = 0
        self.sync_failures = 0

    def now_ms(self) -> int | None:
        """The estimate of the exchange's time, or None before a first ``serverTime``."""
        if self._server_ms is None:
            return None
        return self._server_ms + int((self._clock() - self._anchor) * 1000)

    async def sync(self) -> bool:
        """Ask the exchange for its time now; True when the estimate was renewed."""
        started = self._last_attempt = self._clock()
        try:
            server_ms = await self._fetch()
        except Exception as exc:  # REST errors, a closed session: the previous estimate stays
            self.sync_failures += 1
            log_event(log, logging.WARNING, "cannot read the exchange's time", error=f"{type(exc).__name__}: {exc}")
            return False
        # The answer is from between the request and its arrival; anchoring it at the request keeps the estimate
        # behind the exchange, never ahead of it. It is followed even backwards: a replay's market time stands
        # still while the replay is paused, and the exchange's clock is the reference.
        self._server_ms, self._anchor = server_ms, started
        self.synced_at = started
        self.syncs += 1
        return True

    def request_sync(self) -> None:
        """Start a background :meth:`sync` unless one is in flight or the last began under ``min_interval_s`` ago."""
        if self._task is not None and not self._task.done():
            return
        if self._last_attempt is not None and self._clock() - self._last_attempt < self.min_interval_s:
            return
        self._last_attempt = self._clock()
        self._task = asyncio.get_running_loop().create_task(self.sync())

    async def close(self) -> None:
        """Cancel a request in flight."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
