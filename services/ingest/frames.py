"""Classify one WebSocket frame from Binance's market streams: a trade, a control message, or a rejection.

Pure and total: :func:`parse_frame` accepts any ``str`` or ``bytes`` and never raises. What it returns:

* :class:`TradeFrame` - a validated :class:`~services.core.models.AggTrade`. Accepted shapes are the combined
  stream wrapper ``{"stream": "btcusdt@aggTrade", "data": {"e": "aggTrade", ...}}`` (the stream's symbol and
  ``data.s`` must agree) and a bare ``{"e": "aggTrade", ...}`` payload (raw ``/ws`` connections);
* :class:`ControlFrame` - not market data but meaningful to the connection: the answer to a
  ``SUBSCRIBE``/``UNSUBSCRIBE`` (``{"result": null, "id": 1}``), an error answer (``{"error": {...}}``) or a
  ``serverShutdown`` event (top level, inside a combined wrapper, or inside ``{"event": {...}}``), which tells
  the client to open a replacement connection before this one is closed;
* :class:`RejectedFrame` - everything else, with a reason a person can act on (it goes to the dead-letter
  topic) and the symbol when one could be read (it becomes the dead-letter record's key).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal

from services.core.models import AggTrade, InvalidInput, parse_agg_trade

#: The stream type ingest subscribes to; the suffix of every stream name it expects.
AGG_TRADE_SUFFIX: Final = "@aggTrade"

ControlKind = Literal["reply", "error", "server_shutdown"]


@dataclass(frozen=True, slots=True)
class TradeFrame:
    trade: AggTrade


@dataclass(frozen=True, slots=True)
class ControlFrame:
    kind: ControlKind
    request_id: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RejectedFrame:
    reason: str
    symbol: str | None = None


Frame = TradeFrame | ControlFrame | RejectedFrame


def stream_name(symbol: str) -> str:
    """``BTCUSDT`` → ``btcusdt@aggTrade`` (Binance stream names are lower-case)."""
    return symbol.lower() + AGG_TRADE_SUFFIX


def parse_frame(raw: str | bytes) -> Frame:
    """Classify ``raw`` (see the module docstring); never raises."""
    try:
        obj = json.loads(raw)
    except RecursionError:
        return RejectedFrame("not JSON: nested too deeply")
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return RejectedFrame(f"not JSON: {_short(str(exc))}")
    if not isinstance(obj, dict):
        return RejectedFrame(f"expected a JSON object, got {_json_type(obj)}")
    try:
        return _classify(obj)
    except InvalidInput as exc:
        return RejectedFrame(exc.reason, _symbol_hint(obj))
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:  # defence in depth: never crash
        return RejectedFrame(f"unreadable frame ({type(exc).__name__}: {_short(str(exc))})", None)


def _classify(obj: dict[str, Any]) -> Frame:
    if "stream" in obj or "data" in obj:
        return _combined(obj)
    event = obj.get("e")
    if event == "aggTrade":
        return TradeFrame(parse_agg_trade(obj))
    if event == "serverShutdown":
        return ControlFrame("server_shutdown", detail=_short(json.dumps(obj)))
    nested = obj.get("event")
    if isinstance(nested, dict) and nested.get("e") == "serverShutdown":
        return ControlFrame("server_shutdown", detail=_short(json.dumps(obj)))
    if "result" in obj and "id" in obj:
        return ControlFrame("reply", _request_id(obj.get("id")))
    if "error" in obj:
        return ControlFrame("error", _request_id(obj.get("id")), _short(json.dumps(obj.get("error"))))
    if event is not None:
        return RejectedFrame(f"unexpected event type {_short(str(event))!r}: expected 'aggTrade'")
    return RejectedFrame(f"unrecognised frame with keys {_short(', '.join(sorted(map(str, obj))))}")


def _combined(obj: dict[str, Any]) -> Frame:
    stream = obj.get("stream")
    data = obj.get("data")
    if not isinstance(stream, str):
        return RejectedFrame(f"combined frame: 'stream' must be a string, got {_json_type(stream)}")
    if not isinstance(data, dict):
        return RejectedFrame(f"combined frame: 'data' must be an object, got {_json_type(data)}")
    if data.get("e") == "serverShutdown":
        return ControlFrame("server_shutdown", detail=_short(stream))
    name, at, kind = stream.partition("@")
    if not at or "@" + kind != AGG_TRADE_SUFFIX:
        return RejectedFrame(f"combined frame: stream {_short(stream)!r} is not an aggTrade stream")
    if not name.isascii() or not name.isalnum():
        return RejectedFrame(f"combined frame: stream {_short(stream)!r} does not name a symbol")
    symbol = name.upper()
    try:
        return TradeFrame(parse_agg_trade(data, symbol))
    except InvalidInput as exc:
        return RejectedFrame(exc.reason, symbol)


def _request_id(value: object) -> int | None:
    return value if type(value) is int else None


def _symbol_hint(obj: dict[str, Any]) -> str | None:
    data = obj.get("data")
    source = data if isinstance(data, dict) else obj
    symbol = source.get("s")
    if isinstance(symbol, str) and symbol.isascii() and symbol.isalnum() and len(symbol) <= 40:
        return symbol.upper()
    return None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
