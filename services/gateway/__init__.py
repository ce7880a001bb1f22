"""``gateway``: live klines over WebSocket to browsers and scripts (the seed's ``gateway_task_for_web``).

It reads ``klines.snapshots`` (in-progress klines, every aggregator tick) and ``klines.finalized`` (a kline the
instant it closes) without a consumer group, from the latest offsets (plus a short read-back to warm up), and
pushes every update to the clients subscribed to that ``symbol@interval`` in Binance's kline event shape, so
code written for ``wss://stream.binance.com`` reads it unchanged:

* ``/ws`` sends bare events ``{"e":"kline","E":..,"s":..,"k":{..}}``; ``/stream`` wraps them as Binance's
  combined streams do, ``{"stream":"btcusdt@kline_1m","data":{..}}``. ``/ws/btcusdt@kline_1m`` and
  ``/stream?streams=a/b`` subscribe at connect time, as on Binance.
* Control messages as on Binance: ``{"method":"SUBSCRIBE","params":["btcusdt@kline_1m"],"id":1}`` →
  ``{"result":null,"id":1}``, then the current kline at once and every update after it; ``UNSUBSCRIBE``;
  ``LIST_SUBSCRIPTIONS``. Errors: ``{"error":{"code":..,"msg":..},"id":..}`` (see :mod:`.protocol`).
* One extension: ``"history": N`` on a SUBSCRIBE first sends the last N finalized klines (oldest first, as
  ordinary kline events with ``x`` true), from ClickHouse when the gateway may read it, else from memory.

Slow clients never slow the service or other clients: each has a bounded outbox that keeps one pending message
per kline (latest wins) and the client is disconnected (close code 1008, with the reason) when its outbox
overflows or an update has waited longer than ``gateway.slow_client_timeout_s``. ``/`` serves a live chart.

Try it (``klines run`` prints the page URL; the gateway alone is ``python -m services.gateway``)::

    open http://127.0.0.1:8084/                                  # the chart
    python -m websockets ws://127.0.0.1:8084/ws/btcusdt@kline_1m  # raw events in a terminal
    curl -s http://127.0.0.1:8084/metrics.json                     # clients, subscriptions, messages_out,
                                                                   # updates_coalesced, updates_dropped, lag, ...

Limits behind a reverse proxy: connections are counted per peer address, which is the proxy's; raise
``gateway.max_connections_per_ip`` there, and let the proxy's idle timeout exceed ``gateway.heartbeat_s``.

Modules: :mod:`.protocol` (stream names, requests, events; pure), :mod:`.board` (latest kline per key and
the publish decision; pure), :mod:`.outbox` (per-client coalescing queue, rate limit; pure),
:mod:`.history` (the ClickHouse read), :mod:`.feed` (Kafka), :mod:`.server` (aiohttp, composition root).
"""

COMPONENT = "gateway"
