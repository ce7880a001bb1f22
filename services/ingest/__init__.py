"""ingest: Binance aggTrade streams → the ``trades`` topic, exactly once per trade id, or an explicit gap.

Layers, pure core first (see each module's docstring):

* :mod:`~services.ingest.frames` - classify and validate one WebSocket frame (never raises);
* :mod:`~services.ingest.sequencer` - per symbol: drop duplicates, absorb reordering, detect holes in ``a``,
  and order what is published (the :class:`~services.ingest.sequencer.Outbox`);
* :mod:`~services.ingest.shard` - which of N ingest processes follows a symbol (``[ingest] shard = "i/N"``);
* :mod:`~services.ingest.symbols` - the wanted symbol set (config or ``exchangeInfo``, plus run-time edits), of
  this process's shard;
* :mod:`~services.ingest.rest` - rate-limit-aware ``aggTrades``/``exchangeInfo`` (429 ``Retry-After``, 418 ban);
* :mod:`~services.ingest.backfill` - repair holes from REST, or publish them as gaps;
* :mod:`~services.ingest.connections` - combined-stream WebSockets in groups of streams: rotation, watchdog,
  reconnects;
* :mod:`~services.ingest.publisher` - per-symbol batches to Kafka with bounded delivery time;
* :mod:`~services.ingest.recovery` - each symbol's last published ``a`` from the topic's tail;
* :mod:`~services.ingest.service` - the composition root (start-up, backpressure, health, graceful stop).

Run it with ``python -m services.ingest [--config PATH]``.
"""
