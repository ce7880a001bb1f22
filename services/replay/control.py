"""HTTP control endpoints under ``/_control/``: fault injection and feed status for tests and operators.

Every fault is a POST with a JSON object body (an empty body means ``{}``) and answers ``{"ok":true,...}``;
a bad argument answers 400 ``{"ok":false,"error":...}``.

============================  =================================================================================
``POST drop_connections``     ``{}``
``POST stall``                ``{"seconds": 5}``
``POST skip``                 ``{"symbol": "BTCUSDT", "first_id": 10, "last_id": 20}``
``POST duplicate``            ``{"count": 3, "symbol": null}``
``POST reorder``              ``{"count": 2, "symbol": "BTCUSDT"}``
``POST malformed``            ``{"kind": "bad_json|missing_field|wrong_type|negative_price", "symbol": null}``
``POST future_time``          ``{"count": 1, "symbol": "BTCUSDT", "time_ms": 3786912000000}``: the next frames'
                              ``T`` (default 2090-01-01)
``POST server_shutdown``      ``{"close_after_s": 1.0}``
``POST pause`` / ``resume``   ``{}``
``POST rate_limit``           ``{"weight_limit": 100, "window_s": 60}`` (``null`` limit = off)
``POST ban``                  ``{"seconds": 5}``: REST answers 418 that long (``0`` lifts it)
``POST connection_lifetime``  ``{"seconds": 4}``: connections are closed at that age (``null`` = never)
``GET status``                market time, running/paused/exhausted, connections, per symbol ``last_id``,
                              ``published``, ``total``, ``exhausted``
``GET wait_exhausted``        ``?timeout=30``: answers the status once the feed is exhausted (504 on timeout)
============================  =================================================================================
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from services.replay.faults import FUTURE_TIME_MS

if TYPE_CHECKING:
    from services.replay.faults import Faults

Action = Callable[[dict[str, Any]], Any]


class FeedStatus(Protocol):
    """What the status endpoints need of the exchange (:class:`~services.replay.exchange.ReplayExchange` is one).

    A protocol rather than the exchange class itself: the exchange registers these routes, so importing it
    here would make the two modules import each other.
    """

    def status(self) -> dict[str, Any]: ...

    async def wait_exhausted(self, timeout: float | None = None) -> None: ...  # noqa: ASYNC109 - mirrors the exchange


def _arg(body: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    if name not in body or body[name] is None:
        if default is ...:
            raise ValueError(f"missing argument {name!r}")
        return default
    value = body[name]
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise ValueError(f"argument {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def add_control_routes(app: web.Application, exchange: FeedStatus, faults: Faults) -> None:
    """Register ``/_control/...`` for ``exchange`` (whose fault API is ``faults``)."""

    actions: dict[str, Action] = {
        "drop_connections": lambda b: {"dropped": faults.drop_connections()},
        "stall": lambda b: {"stalled": faults.stall(_arg(b, "seconds", float))},
        "skip": lambda b: faults.skip_trades(_arg(b, "symbol", str), _arg(b, "first_id", int), _arg(b, "last_id", int)),
        "duplicate": lambda b: faults.duplicate_frames(_arg(b, "count", int, 1), _arg(b, "symbol", str, None)),
        "reorder": lambda b: faults.reorder_frames(_arg(b, "count", int, 1), _arg(b, "symbol", str, None)),
        "future_time": lambda b: faults.future_time(
            _arg(b, "count", int, 1), _arg(b, "symbol", str, None), _arg(b, "time_ms", int, FUTURE_TIME_MS)
        ),
        "malformed": lambda b: {"sent": faults.send_malformed(_arg(b, "kind", str), _arg(b, "symbol", str, None))},
        "server_shutdown": lambda b: {"notified": faults.server_shutdown(_arg(b, "close_after_s", float, None))},
        "pause": lambda b: faults.pause_feed(),
        "resume": lambda b: faults.resume_feed(),
        "rate_limit": lambda b: faults.set_rate_limit(
            _arg(b, "weight_limit", int, None), _arg(b, "window_s", float, 60.0)
        ),
        "ban": lambda b: faults.ban(_arg(b, "seconds", float)),
        "connection_lifetime": lambda b: faults.connection_lifetime(_arg(b, "seconds", float, None)),
    }

    def make(action: Action) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            text = await request.text()
            try:
                body = json.loads(text) if text.strip() else {}
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                result = action(body)
            except ValueError as exc:
                return web.json_response({"ok": False, "error": str(exc)}, status=400)
            return web.json_response({"ok": True, **(result or {})})

        return handle

    for name, action in actions.items():
        app.router.add_post(f"/_control/{name}", make(action))

    async def status(request: web.Request) -> web.Response:
        return web.json_response(exchange.status())

    async def wait_exhausted(request: web.Request) -> web.Response:
        try:
            timeout = float(request.query.get("timeout", "30"))
        except ValueError:
            return web.json_response({"ok": False, "error": "timeout must be a number"}, status=400)
        try:
            await exchange.wait_exhausted(timeout)
        except TimeoutError:
            return web.json_response(exchange.status(), status=504)
        return web.json_response(exchange.status())

    app.router.add_get("/_control/status", status)
    app.router.add_get("/_control/wait_exhausted", wait_exhausted)
    app.router.add_post("/_control/wait_exhausted", wait_exhausted)
