"""The gateway's wire protocol: stream names, control requests and their replies, kline events. Pure code.

Requests (one JSON object per text frame, as Binance's market streams accept)::

    {"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m", "ethusdt@kline_5m"], "id": 1}
    {"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 2, "history": 200}   # extension
    {"method": "UNSUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 3}
    {"method": "LIST_SUBSCRIPTIONS", "id": 4}

Replies: ``{"result": null, "id": 1}`` (``LIST_SUBSCRIPTIONS``: the stream names), or an error
``{"error": {"code": C, "msg": "..."}, "id": 1}`` (``id`` is null when it could not be read). Codes follow
Binance's where Binance has one:

* 1 a value has the wrong type (``params`` not a list, ``history`` not an integer ...)
* 2 invalid request (unknown method or field, malformed or unknown stream, unknown symbol or interval)
* 3 invalid JSON (or a binary frame)
* 4 a limit was hit (too many subscriptions, too many messages per second)

A request that fails is applied not at all: a SUBSCRIBE with one bad stream subscribes to none of them.

Events are Binance's kline payload, field for field (``B`` is Binance's ignored field, always ``"0"``); ``E`` is
the Kafka record timestamp: when the aggregator published the update, so ``now - E`` is the delivery latency.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from services.core.intervals import INTERVALS, close_time, open_time
from services.core.models import InvalidInput, Kline, plain

METHODS: Final = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS")
_REQUEST_KEYS: Final = frozenset({"method", "params", "id", "history"})
_STREAM = re.compile(r"([a-z0-9_]{1,40})@kline_([0-9]{1,2}[smhdwM])")
_MAX_ID_LENGTH: Final = 64
_SYMBOL = re.compile(r"[A-Z0-9][A-Z0-9_]{0,39}")
_DECIMAL = re.compile(r"[0-9]{1,60}(?:\.[0-9]{1,60})?")
_INTERVALS: Final = frozenset(INTERVALS)
#: The exact text of :func:`services.shared.messages.encode_kline` (``Kline.to_dict`` order, compact JSON);
#: <D> is a plain decimal string, <I> a trade id (-1 for an empty kline).
_ENCODED_KLINE = re.compile(
    (
        r'\{"t":([0-9]{1,19}),"T":([0-9]{1,19}),"s":"([A-Z0-9][A-Z0-9_]{0,39})","i":"([0-9]{1,2}[smhdwM])",'
        r'"f":<I>,"L":<I>,"o":<D>,"c":<D>,"h":<D>,"l":<D>,"v":<D>,"n":([0-9]{1,19}),"x":(true|false),'
        r'"q":<D>,"V":<D>,"Q":<D>,"version":([0-9]{1,19}),"source":"[a-z]{1,20}"(?:,"seq":([0-9]{1,19}))?\}'
    )
    .replace("<D>", r'"([0-9]{1,60}(?:\.[0-9]{1,60})?)"')
    .replace("<I>", r"(-1|[0-9]{1,19})")
)

RequestId = int | str | None


class ProtocolError(Exception):
    """A request that is answered with an error reply; ``code`` and ``msg`` as Binance's error objects."""

    def __init__(self, code: int, msg: str, request_id: RequestId = None) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.request_id = request_id

    def reply(self) -> str:
        return error_reply(self.code, self.msg, self.request_id)


@dataclass(frozen=True, slots=True)
class Stream:
    """A validated ``<symbol>@kline_<interval>`` subscription (symbol upper-case as on the topics)."""

    symbol: str
    interval: str

    @property
    def name(self) -> str:
        """The Binance stream name: symbol lower-case, interval as is (``1M`` is the month, ``1m`` the minute)."""
        return f"{self.symbol.lower()}@kline_{self.interval}"

    @property
    def key(self) -> str:
        """The topic key ``SYMBOL|interval``."""
        return f"{self.symbol}|{self.interval}"


@dataclass
class Catalog:
    """What may be subscribed to: the configured intervals, and the configured symbols plus any seen on the topics.

    Symbols seen on the topics count so that a symbol the aggregator discovered at run time can be subscribed to
    without a restart.
    """

    intervals: tuple[str, ...]
    symbols: set[str] = field(default_factory=set)

    def stream(self, name: object) -> Stream:
        """Validate one stream name; raise :class:`ProtocolError` (code 2) naming what is wrong."""
        if not isinstance(name, str):
            raise ProtocolError(1, f"Invalid value type: stream names must be strings, got {_type(name)}")
        shown = name if len(name) <= 60 else name[:60] + "..."
        symbol_part, at, rest = name.partition("@")
        if at and not rest.startswith("kline_"):
            raise ProtocolError(
                2, f"Invalid request: unsupported stream {shown!r}: this gateway serves <symbol>@kline_<interval> only"
            )
        match = _STREAM.fullmatch(symbol_part.lower() + at + rest)
        if match is None:
            raise ProtocolError(
                2, f"Invalid request: malformed stream name {shown!r}, expected like 'btcusdt@kline_1m'"
            )
        symbol, interval = match.group(1).upper(), match.group(2)
        if interval not in self.intervals:
            raise ProtocolError(
                2, f"Invalid request: unknown interval {interval!r} in {shown!r} (served: {', '.join(self.intervals)})"
            )
        if symbol not in self.symbols:
            known = sorted(self.symbols)
            listed = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
            raise ProtocolError(2, f"Invalid request: unknown symbol {symbol!r} in {shown!r} (served: {listed})")
        return Stream(symbol, interval)

    def streams(self, names: Iterable[object]) -> list[Stream]:
        """Validate every name (all or nothing), dropping repeats but keeping the order."""
        result: dict[Stream, None] = {}
        for name in names:
            result[self.stream(name)] = None
        return list(result)


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    streams: tuple[Stream, ...]
    id: RequestId
    history: int


def parse_request(text: str, catalog: Catalog, *, history_limit: int) -> Request:
    """Parse and validate one control message; raise :class:`ProtocolError` with the reply to send."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(3, f"Invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(2, f"Invalid request: expected a JSON object, got {_type(obj)}")
    request_id = obj.get("id")
    if not (
        request_id is None
        or (type(request_id) is int and 0 <= request_id < 2**63)
        or (isinstance(request_id, str) and len(request_id) <= _MAX_ID_LENGTH)
    ):
        raise ProtocolError(2, "Invalid request: 'id' must be an unsigned integer, a string (<= 64 chars) or null")
    unknown = sorted(str(k) for k in obj if k not in _REQUEST_KEYS)
    if unknown:
        raise ProtocolError(2, f"Invalid request: unknown field {unknown[0][:40]!r}", request_id)
    method = obj.get("method")
    if method not in METHODS:
        raise ProtocolError(
            2,
            f"Invalid request: unknown method {str(method)[:40]!r}, expected one of {', '.join(METHODS)}",
            request_id,
        )
    params = obj.get("params", [])
    if not isinstance(params, list):
        raise ProtocolError(
            1, f"Invalid value type: 'params' must be a list of stream names, got {_type(params)}", request_id
        )
    history = obj.get("history", 0)
    if type(history) is not int or history < 0:
        raise ProtocolError(1, "Invalid value type: 'history' must be a non-negative integer", request_id)
    if method == "LIST_SUBSCRIPTIONS":
        if params:
            raise ProtocolError(2, "Invalid request: LIST_SUBSCRIPTIONS takes no params", request_id)
        return Request(method, (), request_id, 0)
    if not params:
        raise ProtocolError(2, f"Invalid request: {method} needs at least one stream in 'params'", request_id)
    if method == "UNSUBSCRIBE" and history:
        raise ProtocolError(2, "Invalid request: 'history' applies to SUBSCRIBE only", request_id)
    if history > history_limit:
        raise ProtocolError(
            4, f"Limit exceeded: 'history' = {history} is more than this gateway serves ({history_limit})", request_id
        )
    try:
        streams = catalog.streams(params)
    except ProtocolError as exc:
        exc.request_id = request_id
        raise
    return Request(method, tuple(streams), request_id, history)


def result_reply(result: Any, request_id: RequestId) -> str:
    return json.dumps({"result": result, "id": request_id}, separators=(",", ":"))


def error_reply(code: int, msg: str, request_id: RequestId = None) -> str:
    return json.dumps({"error": {"code": code, "msg": msg}, "id": request_id}, separators=(",", ":"))


def kline_event(kline: Kline, event_time_ms: int) -> str:
    """Binance's kline event for ``kline`` (decimal strings exactly as the kline carries them)."""
    return _event(
        event_time_ms, kline.s, kline.i, kline.t, kline.T, kline.f, kline.L, plain(kline.o), plain(kline.c),
        plain(kline.h), plain(kline.l), plain(kline.v), kline.n, kline.x, plain(kline.q), plain(kline.V),
        plain(kline.Q),
    )  # fmt: skip


def _event(
    e_time: int, s: str, i: str, t: int, close_t: int, f: int, last: int, o: str, c: str, h: str, low: str, v: str,
    n: int, x: bool, q: str, buy_v: str, buy_q: str,
) -> str:  # fmt: skip
    # Plain formatting is safe: callers pass ints, a symbol of [A-Z0-9_], a known interval, plain decimal strings.
    return (
        f'{{"e":"kline","E":{e_time},"s":"{s}","k":{{"t":{t},"T":{close_t},"s":"{s}","i":"{i}","f":{f},"L":{last},'
        f'"o":"{o}","c":"{c}","h":"{h}","l":"{low}","v":"{v}","n":{n},"x":{"true" if x else "false"},"q":"{q}",'
        f'"V":"{buy_v}","Q":"{buy_q}","B":"0"}}}}'
    )


@dataclass(frozen=True, slots=True)
class KlineRecord:
    """A ``klines.snapshots`` / ``klines.finalized`` value, checked for shape, ready to become an event."""

    symbol: str
    interval: str
    t: int
    final: bool
    version: int
    seq: int | None
    _fields: tuple[Any, ...]

    def event(self, event_time_ms: int) -> str:
        return _event(event_time_ms, *self._fields)


def decode_record(raw: bytes | None) -> KlineRecord:
    """Check the shape of a kline topic value (the contract of :func:`services.shared.messages.encode_kline`).

    The gateway only forwards klines, so it checks what it forwards: every field present with its type, a
    symbol, a known interval, plain decimal strings (nothing a client could misread, nothing that needs escaping),
    ``T`` the close of ``t``. The arithmetic consistency (``l <= o <= h`` ...) is the aggregator's and the
    writers' business (:meth:`Kline.from_dict`); skipping it here keeps the gateway at a few microseconds per
    record instead of ~50 (it reads every snapshot of every key). Raises :class:`InvalidInput` with the reason.
    """
    if raw is None:
        raise InvalidInput("empty record (null value)")
    try:
        fast = _ENCODED_KLINE.fullmatch(raw.decode())
    except UnicodeDecodeError:
        fast = None
    if fast is not None:  # exactly what encode_kline writes: one regex instead of json.loads plus checks
        g = fast.groups("")
        t, close_t, interval = int(g[0]), int(g[1]), g[3]
        if interval in _INTERVALS and open_time(interval, t) == t and close_time(interval, t) == close_t:
            seq = int(g[17]) if g[17] else None
            final = g[12] == "true"
            fields = (g[2], interval, t, close_t, *g[4:12], final, *g[13:16])
            return KlineRecord(g[2], interval, t, final, int(g[16]), seq, fields)
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"expected a JSON object, got {_type(obj)}")
    try:
        s, i, t, close_t, f, last, n, x = (obj[k] for k in ("s", "i", "t", "T", "f", "L", "n", "x"))
        decimals = [obj[k] for k in ("o", "c", "h", "l", "v", "q", "V", "Q")]
    except KeyError as exc:
        raise InvalidInput(f"missing field {exc.args[0]!r}") from None
    if type(s) is not str or _SYMBOL.fullmatch(s) is None:
        raise InvalidInput(f"field 's' = {str(s)[:40]!r} is not a symbol")
    if i not in _INTERVALS:
        raise InvalidInput(f"field 'i' = {str(i)[:20]!r} is not an interval")
    for name, value in (("t", t), ("T", close_t), ("f", f), ("L", last), ("n", n)):
        if type(value) is not int:
            raise InvalidInput(f"field {name!r} must be an integer, got {_type(value)}")
    if type(x) is not bool:
        raise InvalidInput(f"field 'x' must be true or false, got {_type(x)}")
    for name, value in zip(("o", "c", "h", "l", "v", "q", "V", "Q"), decimals, strict=True):
        if type(value) is not str or _DECIMAL.fullmatch(value) is None:
            raise InvalidInput(f"field {name!r} = {str(value)[:40]!r} is not a plain decimal string")
    if t < 0 or close_t != close_time(i, open_time(i, t)) or open_time(i, t) != t:
        raise InvalidInput(f"fields 't' = {t} / 'T' = {close_t} are not an open and close time of {i!r}")
    version, seq = obj.get("version", 0), obj.get("seq")
    if type(version) is not int or version < 0:
        raise InvalidInput(f"field 'version' must be a non-negative integer, got {str(version)[:20]!r}")
    if seq is not None and (type(seq) is not int or seq < 0):
        raise InvalidInput(f"field 'seq' must be a non-negative integer, got {str(seq)[:20]!r}")
    return KlineRecord(s, i, t, x, version, seq, (s, i, t, close_t, f, last, *decimals[:5], n, x, *decimals[5:]))


def combined(stream_name: str, event: str) -> str:
    """Wrap an event as Binance's combined streams do: ``{"stream": name, "data": event}``."""
    return f'{{"stream":"{stream_name}","data":{event}}}'


def streams_from_url(path_tail: str, query: Mapping[str, str], catalog: Catalog) -> list[Stream]:
    """Subscriptions named in the URL: ``/ws/a/b`` or ``/stream?streams=a/b`` (Binance's forms)."""
    names = [n for n in path_tail.split("/") if n]
    if query.get("streams"):
        names += [n for n in query["streams"].split("/") if n]
    return catalog.streams(names)


def _type(value: object) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def origin_allowed(origin: str | None, host: str | None, allowed: Iterable[str]) -> bool:
    """Whether a WebSocket upgrade with this ``Origin`` header may connect (``gateway.allowed_origins``).

    No ``Origin``: allowed. Browsers always send it on a WebSocket upgrade, so its absence means a program
    (klines tail, a script, a probe), which could send any ``Origin`` it liked anyway: the check is against
    other web sites' pages opening sockets from a visitor's browser (cross-site WebSocket hijacking), not
    against programs. With ``allowed`` empty the page's own origin is allowed: the Origin's host[:port] equals
    the request's ``Host``. Otherwise an Origin is allowed when it is listed (``scheme://host[:port]``, any case);
    ``*`` allows every origin.
    """
    if origin is None:
        return True
    origin = origin.strip().lower().rstrip("/")
    listed = [entry.strip().lower().rstrip("/") for entry in allowed]
    if listed:
        return "*" in listed or origin in listed
    scheme, sep, netloc = origin.partition("://")
    if not sep or scheme not in ("http", "https") or not netloc or host is None:
        return False  # "null" (a sandboxed page, a file), or no Host to compare with
    return netloc == host.strip().lower()
