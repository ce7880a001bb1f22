"""Classify one WebSocket frame from Binance's market streams: a trade, a control message, or a rejection.

Pure and total: :func:`parse_frame` accepts any ``str`` or ``bytes`` and never raises. Validation is
``parse_agg_trade``'s; frames in Binance's exact layout take a shortcut proven to agree with it
(:func:`fast_trade`). What it returns:

* a validated trade as a :class:`WireTrade`: its symbol, its id ``a`` and its JSON object exactly as ingest
  publishes it in a batch record (what the sequencer and the publisher need, nothing more: this runs for every
  trade, and a trade in Binance's layout is never decoded into fields and encoded again). Accepted shapes are
  the combined stream wrapper ``{"stream": "btcusdt@aggTrade", "data": {"e": "aggTrade", ...}}`` (the
  stream's symbol and ``data.s`` must agree) and a bare ``{"e": "aggTrade", ...}`` payload (raw ``/ws``
  connections);
* :class:`ControlFrame` - not market data but meaningful to the connection: the answer to a
  ``SUBSCRIBE``/``UNSUBSCRIBE`` (``{"result": null, "id": 1}``), an error answer (``{"error": {...}}``) or a
  ``serverShutdown`` event (top level, inside a combined wrapper, or inside ``{"event": {...}}``), which tells
  the client to open a replacement connection before this one is closed;
* :class:`RejectedFrame` - everything else, with a reason a person can act on and its category (both go to the
  dead-letter topic) and the symbol when one could be read (it becomes the dead-letter record's key).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from typing import Any, Final, Literal, NamedTuple

from services.core.models import (
    MAX_ID,
    MAX_TIME_MS,
    MIN_TIME_MS,
    AggTrade,
    InvalidInput,
    ReasonCategory,
    parse_agg_trade,
)
from services.shared.messages import encode_trade_batch

#: The stream type ingest subscribes to; the suffix of every stream name it expects.
AGG_TRADE_SUFFIX: Final = "@aggTrade"

ControlKind = Literal["reply", "error", "server_shutdown"]


@dataclass(frozen=True, slots=True)
class ControlFrame:
    kind: ControlKind
    request_id: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RejectedFrame:
    reason: str
    category: ReasonCategory
    symbol: str | None = None


class WireTrade(NamedTuple):
    """One validated aggTrade as ingest publishes it.

    ``fields`` are the members of its JSON object in a ``trades`` batch record, without the braces:
    ``"a":26129,"p":"0.01633102","q":"4.70443515","f":27781,"l":27781,"T":1767225600100,"m":true``, byte for
    byte what :func:`~services.shared.messages.encode_trade_batch` writes for the same trade (the contract of the
    ``trades`` topic; tests prove the equality). For a frame in Binance's layout they are a slice of the frame
    itself: Binance sends exactly these members in this order, with canonical integers and the decimal strings
    that are kept verbatim anyway.

    A named tuple because the fast path builds one per trade: ``tuple.__new__`` is a single C call, where a
    class's ``__init__`` is a Python frame that sets each attribute.
    """

    s: str
    a: int
    fields: bytes

    def trade(self) -> AggTrade:
        """The trade as the core's :class:`~services.core.models.AggTrade` (for checks and tests, not the hot path)."""
        return parse_agg_trade(json.loads(b"{" + self.fields + b"}"), self.s)


def wire_trade(trade: AggTrade) -> WireTrade:
    """A validated trade (from REST, or a frame off the fast path) in the form ingest publishes.

    The fields come from the topic's own encoder, so the two ways into a batch record cannot drift apart.
    """
    value = encode_trade_batch(trade.s, (trade,))
    start = len(_BATCH_HEAD) + len(trade.s) + len(_BATCH_MID)
    return WireTrade(trade.s, trade.a, value[start:-3])


def trade_time(fields: bytes) -> int:
    """``T`` of a :class:`WireTrade`'s ``fields`` (its members always end with ``"T":<ms>,"m":<bool>``).

    Every ``T`` the contract accepts has 13 digits, so its place is known from the end (``,"m":true`` or
    ``,"m":false``): one slice, no search, for the publisher's screen of every trade."""
    end = -9 if fields[-2] == 117 else -10  # the 'u' of true, else false
    if fields[end - 17 : end - 13] == b'"T":':
        return int(fields[end - 13 : end])
    start = fields.rindex(b'"T":') + 4
    return int(fields[start : fields.index(b",", start)])


#: The 14 bytes before a ``fields``' last 9: ``:`` + T's 13 digits before ``,"m":true``, or the 13 digits + ``,``
#: before ``"m":false``.
_T_SPAN: Final = itemgetter(slice(-23, -9))


def trade_time_texts(fields: Iterable[bytes]) -> list[bytes]:
    """``T`` of each of ``fields`` as its 13 digits (bytes compare like the numbers): :func:`trade_time` for a
    whole round at C speed (two C calls a trade), as the publisher's screen needs it."""
    return list(map(bytes.strip, map(_T_SPAN, fields), repeat(b":,")))


_BATCH_HEAD: Final = b'{"type":"trades","s":"'
_BATCH_MID: Final = b'","trades":[{'
_BATCH_TAIL: Final = b"}]}"


def batch_value(symbol: bytes, trades: list[bytes]) -> bytes:
    """A ``trades`` batch record from the trades' ``fields``: byte for byte ``encode_trade_batch`` of the same
    trades (tests prove it), without a trade being formatted again."""
    return _BATCH_HEAD + symbol + _BATCH_MID + b"},{".join(trades) + _BATCH_TAIL


Frame = WireTrade | ControlFrame | RejectedFrame


def stream_name(symbol: str) -> str:
    """``BTCUSDT`` → ``btcusdt@aggTrade`` (Binance stream names are lower-case)."""
    return symbol.lower() + AGG_TRADE_SUFFIX


# The exact layout Binance (and the replay exchange) send an aggTrade in, on a combined stream, as bytes. Only
# what parse_agg_trade accepts can match (no leading zeros in JSON numbers, plain decimals, upper-case symbol,
# bounded digit counts); the remaining checks (ranges, f <= l, prices > 0, stream symbol == s) follow in
# fast_trade. Anything else - other key order, spaces, unknown fields, any doubt - takes the general path.
_FAST = re.compile(
    rb'\{"stream":"([a-z0-9]{1,40}+)@aggTrade","data":\{"e":"aggTrade","E":(?:0|[1-9][0-9]{0,18}+),'
    rb'"s":"([A-Z0-9]{1,40}+)",("a":(0|[1-9][0-9]{0,18}+),"p":"([0-9]{1,24}+(?:\.[0-9]{1,18}+)?+)",'
    rb'"q":"([0-9]{1,24}+(?:\.[0-9]{1,18}+)?+)","f":(0|[1-9][0-9]{0,18}+),"l":(0|[1-9][0-9]{0,18}+),'
    rb'"T":([1-9][0-9]{12}),"m":(?:true|false))(?:,"M":(?:true|false))?+\}\}'
)
# Possessive quantifiers (``{m,n}+``): no digit run can end anywhere but where it does (the next token is a
# quote, comma, dot or brace), so they accept the same language without the backtracking bookkeeping.
_MIN_T: Final = str(MIN_TIME_MS).encode()  # 13 digits, like every T the pattern accepts: compared as bytes
_MAX_T: Final = str(MAX_TIME_MS).encode()
_new_wire_trade: Final = tuple.__new__
# Symbol bytes -> (the symbol, its stream name): decoded once per symbol, not once per trade.
_SYMBOLS: dict[bytes, tuple[str, bytes]] = {}


def fast_trade(raw: bytes) -> WireTrade | None:
    """The trade in a frame of Binance's exact combined-stream layout, or None (then use the general path).

    A shortcut, not a second validator: it accepts a strict subset of what ``json.loads`` + ``parse_agg_trade``
    accept and returns exactly the same trade (a property test checks this on generated and mutated frames).
    It exists because the general path costs several times as much, and ingest parses every trade: one regular
    expression match, then only the checks the pattern cannot express (stream name = symbol, prices and
    quantities > 0, ids within 64 bits, ``f <= l``, ``T`` in range), without building the trade's fields.
    """
    match = _FAST.fullmatch(raw)
    if match is None:
        return None
    name, symbol, fields, a_, p, q, f_, l_, t_ = match.groups()
    known = _SYMBOLS.get(symbol)
    if known is None:
        if symbol.lower() != name or len(_SYMBOLS) >= 100_000:
            return None
        known = _SYMBOLS[symbol] = (symbol.decode(), name)
    elif known[1] != name:
        return None
    if not p.strip(b"0.") or not q.strip(b"0.") or not _MIN_T <= t_ <= _MAX_T:
        return None
    # f <= l on canonical integers (no leading zeros): shorter is smaller, equal lengths compare as text.
    if len(f_) > len(l_) or (len(f_) == len(l_) and f_ > l_):
        return None
    a = int(a_)
    if a > MAX_ID or (len(l_) == 19 and int(l_) > MAX_ID):  # 19 digits may exceed 2**63 - 1
        return None
    return _new_wire_trade(WireTrade, (known[0], a, fields))


def parse_frame(raw: str | bytes) -> Frame:
    """Classify ``raw`` (see the module docstring); never raises."""
    if type(raw) is bytes:
        trade = fast_trade(raw)
        if trade is not None:
            return trade
    return parse_frame_general(raw)


def parse_frame_general(raw: str | bytes) -> Frame:
    """:func:`parse_frame` without the fast path: ``json.loads``, the wrapper checks, ``parse_agg_trade``."""
    frame = _parse_general(raw)
    return wire_trade(frame) if isinstance(frame, AggTrade) else frame


def _parse_general(raw: str | bytes) -> AggTrade | ControlFrame | RejectedFrame:
    try:
        # Decoding first is cheaper than json.loads(bytes), which sniffs the encoding of every frame.
        obj = json.loads(raw.decode() if isinstance(raw, bytes | bytearray) else raw)
    except RecursionError:
        return RejectedFrame("not JSON: nested too deeply", "malformed")
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return RejectedFrame(f"not JSON: {_short(str(exc))}", "malformed")
    if not isinstance(obj, dict):
        return RejectedFrame(f"expected a JSON object, got {_json_type(obj)}", "malformed")
    try:
        return _classify(obj)
    except InvalidInput as exc:
        return RejectedFrame(exc.reason, exc.category, _symbol_hint(obj))
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:  # defence in depth: never crash
        return RejectedFrame(f"unreadable frame ({type(exc).__name__}: {_short(str(exc))})", "internal")


def _classify(obj: dict[str, Any]) -> AggTrade | ControlFrame | RejectedFrame:
    if "stream" in obj or "data" in obj:
        return _combined(obj)
    event = obj.get("e")
    if event == "aggTrade":
        return parse_agg_trade(obj)
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
        return RejectedFrame(f"unexpected event type {_short(str(event))!r}: expected 'aggTrade'", "malformed")
    return RejectedFrame(f"unrecognised frame with keys {_short(', '.join(sorted(map(str, obj))))}", "malformed")


def _combined(obj: dict[str, Any]) -> AggTrade | ControlFrame | RejectedFrame:
    stream = obj.get("stream")
    data = obj.get("data")
    if not isinstance(stream, str):
        return RejectedFrame(f"combined frame: 'stream' must be a string, got {_json_type(stream)}", "malformed")
    if not isinstance(data, dict):
        return RejectedFrame(f"combined frame: 'data' must be an object, got {_json_type(data)}", "malformed")
    if data.get("e") == "serverShutdown":
        return ControlFrame("server_shutdown", detail=_short(stream))
    name, at, kind = stream.partition("@")
    if not at or "@" + kind != AGG_TRADE_SUFFIX:
        return RejectedFrame(f"combined frame: stream {_short(stream)!r} is not an aggTrade stream", "malformed")
    if not name.isascii() or not name.isalnum():
        return RejectedFrame(f"combined frame: stream {_short(stream)!r} does not name a symbol", "symbol")
    symbol = name.upper()
    try:
        if "s" not in data:
            return parse_agg_trade(data, symbol)
        trade = parse_agg_trade(data)  # validates 's' once; the comparison below is the other half
    except InvalidInput as exc:
        return RejectedFrame(exc.reason, exc.category, symbol)
    if trade.s != symbol:
        return RejectedFrame(
            f"field 's' (symbol) = {trade.s!r} does not match the stream's symbol {symbol!r}", "symbol", symbol
        )
    return trade


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
