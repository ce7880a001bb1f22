"""A local Binance: replays a synthetic or recorded market over Binance's own WebSocket and REST protocol.

The whole pipeline runs against it without Binance: in tests, and for offline runs. One port serves both
protocols (spot paths, or USD-M futures paths with ``venue="usdm"``):

* WebSocket ``/stream?streams=btcusdt@aggTrade/...`` (combined), ``/ws/btcusdt@aggTrade`` (raw) and ``/ws``
  (``SUBSCRIBE``/``UNSUBSCRIBE``/``LIST_SUBSCRIPTIONS``); futures under ``/market/...``. Frames are Binance's exact
  aggTrade payloads. Pings every 20 s, pong timeout 60 s, 1024 streams and 5 (futures 10) control messages/s
  per connection. See :mod:`services.replay.streams`.
* REST ``/api/v3/aggTrades``, ``klines``, ``exchangeInfo``, ``time``, ``ping`` (futures ``/fapi/v1/...``) over
  the trades published so far; ``serverTime`` is market time. See :mod:`services.replay.rest`.
* Faults on command — ``/_control/...`` over HTTP or ``exchange.faults`` in Python: drop, stall, skip ids,
  duplicate, reorder, malformed frames, ``serverShutdown``, pause/resume, REST 429s. See
  :mod:`services.replay.faults` and :mod:`services.replay.control`.

Feeds: a seeded market generator (:mod:`services.replay.generator`) or data.binance.vision aggTrades CSV files.
Market time runs at ``speed`` × real time, or as fast as the clients read with ``speed=0``
(:mod:`services.replay.clock`); a trade is published when market time reaches its ``T``.

Python API::

    config = ReplayConfig(feed=GeneratorFeed(symbols=("BTCUSDT",), seed=1), speed=0)
    async with ReplayExchange(config) as ex:           # port 0 = a free port
        ex.ws_url, ex.rest_url, ex.port                # bases, like wss://stream.binance.com:9443
        ex.stream_url(["BTCUSDT"])                     # the venue's combined-stream URL
        ex.trades("BTCUSDT")                           # every trade of the feed
        ex.published_trades("BTCUSDT")                 # the ones public so far
        ex.faults.drop_connections()                   # ... see Faults
        ex.start_feed()                                # start market time now (see autostart)
        await ex.wait_exhausted(timeout=10)            # all published and market time at the feed's end
        ex.market_time_ms(), ex.status()               # = GET /api/v3/time, GET /_control/status

``ReplayExchange(config, trades={"BTCUSDT": [...]})`` replays scripted trades instead of the configured feed.
By default the feed starts at the first aggTrade subscription (``autostart``), so a fast replay is not over
before the client has connected.

Command line: ``python -m services.replay --help``. Send rate: ``python -m services.replay.send_rate``.
"""

from services.replay.config import FileFeed, GeneratorFeed, ReplayConfig
from services.replay.exchange import ReplayExchange
from services.replay.faults import Faults

__all__ = ["Faults", "FileFeed", "GeneratorFeed", "ReplayConfig", "ReplayExchange"]
