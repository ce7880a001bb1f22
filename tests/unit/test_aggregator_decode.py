"""The aggregator's fast ``trades`` decoder gives exactly the contract's verdicts (property tests).

Every layout the fast path reads is generated valid and then (usually) broken in one way: ingest's batches,
Binance's bare aggTrade payloads and its combined-stream envelopes. The contract
(:func:`~services.shared.messages.decode_trades_value`) is the oracle for the verdict, the values and the reason.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from services.aggregator.decode import TradesDecoder
from services.core.book import KlineBook
from services.core.models import MIN_TIME_MS, AggTrade, InvalidInput
from services.shared.messages import Gap, TradeBatch, decode_trades_value, encode_gap, encode_trade_batch

pytestmark = pytest.mark.unit

T0 = 1_735_689_600_000

decimals = st.one_of(
    st.sampled_from(["0.01633102", "4.70443515", "100", "1.5", "0.00000001", "26000.10000000"]),
    st.decimals(min_value="0.00000001", max_value="1000000", places=8, allow_nan=False).map(str),
)
MAX_ID = 2**63 - 1
#: Values each field must refuse (plus a few every field must refuse).
BAD: dict[str, list[Any]] = {
    "a": [-1, MAX_ID + 1, 1.5, True, "1"],
    "f": [-1, MAX_ID + 1, 2.0, False, "7"],
    "l": [-1, MAX_ID + 1, 3.5, True, "7"],
    "T": [1_262_303_999_999, 4_102_444_800_001, -5, 1.5, "1735689600000", True],
    "p": ["0", "0.000", ".5", "5.", "-1.0", "1e5", "NaN", "Infinity", " 1.0", "1." + "0" * 18 + "1", "１.0", 1, ""],
    "q": ["0", "00.00", "1.", ".0001", "1" * 24 + ".5" + "0" * 18, "+1", "1E-8", "nan", "1,5", "0.1 ", 2, None],
    "m": [1, 0, "true", None, "false"],
}
BAD["q"].append("1" * 25)
ANY_BAD: list[Any] = [None, [], {}, "x"]


@st.composite
def trade_items(draw: st.DrawFn) -> dict[str, Any]:
    f = draw(st.integers(0, 10**12))
    return {
        "a": draw(st.integers(0, 10**12)),
        "p": draw(decimals),
        "q": draw(decimals),
        "f": f,
        "l": f + draw(st.integers(0, 5)),
        "T": T0 + draw(st.integers(0, 10**9)),
        "m": draw(st.booleans()),
    }


@st.composite
def records(draw: st.DrawFn) -> tuple[bytes | None, bytes | None]:
    """A valid ingest record with (usually) exactly one thing wrong with it."""
    symbol = "BTCUSDT"
    items = draw(st.lists(trade_items(), min_size=1, max_size=3))
    key: bytes | None = symbol.encode()
    target = draw(st.integers(0, len(items) - 1))
    mutation = draw(
        st.sampled_from(["none", "value", "value", "value", "value", "missing", "extra", "f>l", "symbol", "key"])
    )
    if mutation == "value":
        name = draw(st.sampled_from(sorted(BAD)))
        items[target][name] = draw(st.sampled_from(BAD[name] + ANY_BAD))
    elif mutation == "missing":
        del items[target][draw(st.sampled_from(sorted(items[target])))]
    elif mutation == "extra":
        extra = draw(st.sampled_from(["E", "M", "s", "e", "x"]))
        items[target][extra] = draw(st.sampled_from([1, True, "BTCUSDT", "aggTrade", "trade", "ethusdt", 1.5]))
    elif mutation == "f>l":
        items[target]["l"] = items[target]["f"] - 1
    elif mutation == "symbol":
        symbol = draw(st.sampled_from(["btcusdt", "BTC_USDT", "ÄBC", "", "X" * 41, "1000SHIBUSDT", "B T"]))
        key = draw(st.sampled_from([None, symbol.encode()]))
    elif mutation == "key":
        key = draw(st.sampled_from([None, b"OTHER", b"\xff", b"btcusdt"]))
    shape = draw(st.sampled_from(["batch"] * 6 + ["text"] * 3 + ["gap", "raw", "garbage", "empty"]))
    if shape == "gap":
        raw: bytes | None = encode_gap(Gap(symbol or "BTCUSDT", 5, draw(st.integers(0, 9)), "test"))
    elif shape == "raw":
        raw = json.dumps({"e": "aggTrade", "s": symbol, **items[0]}).encode()
    elif shape == "garbage":
        raw = draw(st.sampled_from([None, b"", b"{", b"[]", b"\xff\xfe", b'{"type":"trades",', b"null"]))
    elif shape == "empty":
        raw = json.dumps({"type": "trades", "s": symbol, "trades": draw(st.sampled_from([[], None, {}, [1]]))}).encode()
    else:
        raw = json.dumps({"type": "trades", "s": symbol, "trades": items}, separators=(",", ":")).encode()
        if shape == "text":  # one byte-level edit of the ingest layout
            at = draw(st.integers(0, len(raw)))
            edit = draw(st.sampled_from([b" ", b"0", b"-", b"e", b".", b",", b"]", b"\n", b"", b'"', b"\\u0031"]))
            cut = draw(st.integers(0, 2))
            raw = raw[:at] + edit + raw[at + cut :]
    return raw, key


STREAM_NAMES = ["btcusdt@aggTrade", "BTCUSDT@aggTrade", "BtcUsdt@aggTrade", "btcusdt@trade", "btcusdt",
                "ethusdt@aggTrade", "btc usdt@aggTrade", "b\u0131tcusdt@aggTrade", "@aggTrade", "btcusdt@aggTrade@x",
                "x" * 41 + "@aggTrade", "btc_usdt@aggTrade", 5, None, ["btcusdt@aggTrade"]]  # fmt: skip


def binance_layout(symbol: str, item: dict[str, Any]) -> dict[str, Any]:
    """A payload in the order Binance sends its fields: ``e E s a p q f l T m M``."""
    return {"e": "aggTrade", "E": item["T"] + 3, "s": symbol, **item, "M": True}


@st.composite
def payload_records(draw: st.DrawFn) -> tuple[bytes | None, bytes | None]:
    """A Binance aggTrade payload, bare or in a combined-stream envelope, with (usually) one thing wrong."""
    symbol: Any = "BTCUSDT"
    key: bytes | None = symbol.encode()
    payload: dict[str, Any] = binance_layout(symbol, draw(trade_items()))
    mutation = draw(
        st.sampled_from(
            ["none"] * 3 + ["value"] * 3 + ["missing", "extra", "f>l", "symbol", "key", "E", "M", "e", "order"]
        )
    )
    if mutation == "value":
        name = draw(st.sampled_from(sorted(BAD)))
        payload[name] = draw(st.sampled_from(BAD[name] + ANY_BAD))
    elif mutation == "missing":
        del payload[draw(st.sampled_from(sorted(payload)))]
    elif mutation == "extra":
        extra = draw(st.sampled_from(["type", "nq", "x", "stream", "data", "trades", "from_a"]))
        payload[extra] = draw(st.sampled_from([1, True, "trades", "gap", "é", "\udc80", None, {"e": 1}, [], 1.5e300]))
    elif mutation == "f>l":
        payload["l"] = payload["f"] - 1
    elif mutation == "symbol":
        payload["s"] = draw(st.sampled_from(["btcusdt", "ETHUSDT", "BTC_USDT", "ÄBC", "ß", "", "X" * 41, 5, None]))
    elif mutation == "key":
        key = draw(st.sampled_from([None, b"ETHUSDT", b"btcusdt", b"\xff", b"", b"BTC_USDT"]))
    elif mutation == "E":
        payload["E"] = draw(st.sampled_from([1.5, "1", True, None, 2**70, -3, 0]))
    elif mutation == "M":
        payload["M"] = draw(st.sampled_from([1, "true", None, False, 0.0]))
    elif mutation == "e":
        payload["e"] = draw(st.sampled_from(["trade", "AGGTRADE", "", None, 1, "serverShutdown"]))
    elif mutation == "order":
        payload = dict(reversed(list(payload.items())))
    obj: Any = payload
    if draw(st.booleans()):  # the combined-stream envelope
        stream: Any = draw(st.sampled_from(STREAM_NAMES[:1] * 8 + STREAM_NAMES))
        obj = {"stream": stream, "data": payload}
        wrapper = draw(st.sampled_from(["none"] * 6 + ["no s", "data", "top", "order", "no stream"]))
        if wrapper == "no s":
            payload.pop("s", None)
        elif wrapper == "data":
            obj["data"] = draw(st.sampled_from([None, [], "x", 1, [payload]]))
        elif wrapper == "top":
            obj[draw(st.sampled_from(["type", "e", "x", "s"]))] = draw(st.sampled_from(["aggTrade", "trades", 1, "é"]))
        elif wrapper == "order":
            obj = {"data": payload, "stream": stream}
        elif wrapper == "no stream":
            del obj["stream"]
    style = draw(st.sampled_from(["binance"] * 4 + ["spaces", "unicode", "text"]))
    if style == "spaces":
        raw = json.dumps(obj).encode()
    elif style == "unicode":
        raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    else:
        raw = json.dumps(obj, separators=(",", ":")).encode()
        if style == "text":  # one byte-level edit of Binance's layout
            at = draw(st.integers(0, len(raw)))
            edits = [b" ", b"0", b"-", b"e", b".", b",", b"}", b"\n", b"", b'"', b"\\u0031", b"\xc3"]
            edit = draw(st.sampled_from(edits))
            raw = raw[:at] + edit + raw[at + draw(st.integers(0, 2)) :]
    return raw, key


any_records = st.one_of(records(), payload_records())


def verdict(decode: Any, raw: bytes | None, key: bytes | None) -> TradeBatch | Gap | str:
    try:
        result: TradeBatch | Gap = decode(raw, key)
    except InvalidInput as exc:
        return "rejected: " + exc.reason
    return result


@settings(max_examples=1500, deadline=None)
@given(any_records)
def test_fast_path_agrees_with_the_contract(record: tuple[bytes | None, bytes | None]) -> None:
    raw, key = record
    decoder = TradesDecoder()
    expected = verdict(decode_trades_value, raw, key)
    assert verdict(decoder.decode, raw, key) == expected
    canonical = isinstance(expected, TradeBatch) and raw == encode_trade_batch(expected.symbol, expected.trades)
    if canonical and key is not None and expected.symbol.isupper() and expected.symbol.isascii():  # type: ignore[union-attr]
        assert decoder.fast == 1, "ingest's own layout must take the fast path"
    if isinstance(expected, TradeBatch) and len(expected.trades) == 1 and key == expected.symbol.encode():
        trade = expected.trades[0]
        item = {"a": trade.a, "p": trade.p, "q": trade.q, "f": trade.f, "l": trade.l, "T": trade.T, "m": trade.m}
        payload = json.dumps(binance_layout(trade.s, item), separators=(",", ":"))
        envelope = f'{{"stream":"{trade.s.lower()}@aggTrade","data":{payload}}}'
        if raw in (payload.encode(), envelope.encode()):
            assert decoder.fast == 1, "Binance's own layout must take the fast path"


def test_the_ingest_layout_takes_the_fast_path() -> None:
    decoder = TradesDecoder()
    trades = [
        AggTrade("BTCUSDT", 10 + k, "26000.10000000", "0.50000000", 20 + k, 20 + k, T0 + k, k % 2 == 0)
        for k in range(3)
    ]
    raw = encode_trade_batch("BTCUSDT", trades)
    assert decoder.decode(raw, b"BTCUSDT") == TradeBatch("BTCUSDT", trades)
    assert decoder.columns(raw, "BTCUSDT") == columns_of(trades)
    assert decoder.decode(raw, None) == TradeBatch("BTCUSDT", trades)  # no key: the contract's decoder
    assert (decoder.fast, decoder.slow) == (2, 1)
    assert decoder.columns(raw, "ETHUSDT") is None


def test_everything_else_is_the_contract_verbatim() -> None:
    decoder = TradesDecoder()
    gap = Gap("BTCUSDT", 10, 19, "backfill failed")
    assert decoder.decode(encode_gap(gap), b"BTCUSDT") == gap
    with pytest.raises(InvalidInput, match="does not match symbol"):
        decoder.decode(encode_trade_batch("BTCUSDT", [AggTrade("BTCUSDT", 1, "1", "1", 1, 1, T0, True)]), b"ETHUSDT")
    with pytest.raises(InvalidInput, match="not JSON"):
        decoder.decode(b"{nope", b"BTCUSDT")
    assert decoder.fast == 0 and decoder.slow == 3


@pytest.mark.parametrize(
    ("field", "value"), [(name, value) for name, values in BAD.items() for value in values + ANY_BAD]
)
def test_every_bad_field_value_is_rejected_with_the_contracts_reason(field: str, value: Any) -> None:
    item = {"a": 5, "p": "1.5", "q": "2", "f": 7, "l": 9, "T": T0, "m": False, field: value}
    raw = json.dumps({"type": "trades", "s": "BTCUSDT", "trades": [item]}, separators=(",", ":")).encode()
    expected = verdict(decode_trades_value, raw, b"BTCUSDT")
    assert isinstance(expected, str), f"the contract accepts {field}={value!r}?"
    assert verdict(TradesDecoder().decode, raw, b"BTCUSDT") == expected


def test_first_id_after_last_id_is_rejected() -> None:
    item = {"a": 5, "p": "1.5", "q": "2", "f": 9, "l": 7, "T": T0, "m": False}
    raw = json.dumps({"type": "trades", "s": "BTCUSDT", "trades": [item]}).encode()
    assert verdict(TradesDecoder().decode, raw, None) == verdict(decode_trades_value, raw, None)


@settings(max_examples=300, deadline=None)
@given(st.lists(any_records, min_size=1, max_size=4))
def test_a_run_of_records_passes_the_checks_exactly_when_each_record_does(
    run: list[tuple[bytes | None, bytes | None]],
) -> None:
    """The engine checks a symbol's consecutive records at once (batches and payloads mixed): the same verdict,
    the same columns."""
    decoder = TradesDecoder()
    parsed = [items for raw, _key in run if (items := decoder.items(raw, "BTCUSDT")) is not None]
    assume(parsed)
    each = [decoder.checked(items) for items in parsed]
    merged = decoder.checked([trade for items in parsed for trade in items])
    if any(columns is None for columns in each):
        assert merged is None
    else:
        assert merged == tuple(
            [value for columns in each for value in columns[k]]  # type: ignore[index]
            for k in range(7)
        )


@settings(max_examples=800, deadline=None)
@given(any_records)
def test_what_the_book_folds_unchecked_the_contract_accepts(record: tuple[bytes | None, bytes | None]) -> None:
    """The engine hands a run's prices and quantities to KlineBook.extend unchecked: whatever it folds, the
    contract accepts, with the same trades; whatever the contract refuses, it refuses."""
    raw, _key = record
    decoder = TradesDecoder()
    items = decoder.items(raw, "BTCUSDT")
    assume(items is not None)
    assert items is not None
    columns = decoder.columns_of(items)
    expected = verdict(decode_trades_value, raw, b"BTCUSDT")
    if columns is None:
        assert isinstance(expected, str)
        return
    book = KlineBook("BTCUSDT", ["1m"])
    first_a, first_t = columns[0][0], columns[1][0]
    if first_a > 0 and first_t > MIN_TIME_MS:  # a book that already holds the trade before: one trade continues
        book.apply([AggTrade("BTCUSDT", first_a - 1, "1", "1", 0, 0, first_t - 1, False)])
    before = book.export_state()
    if book.extend(columns):
        assert isinstance(expected, TradeBatch) and columns_of(expected.trades) == columns
    else:
        assert book.export_state() == before


def columns_of(trades: list[AggTrade]) -> tuple[list[Any], ...]:
    return (
        [t.a for t in trades], [t.T for t in trades], [t.p for t in trades], [t.q for t in trades],
        [t.f for t in trades], [t.l for t in trades], [t.m for t in trades],
    )  # fmt: skip


def test_binance_payloads_bare_and_enveloped_are_trades_of_the_contract() -> None:
    trade = AggTrade("BTCUSDT", 26129, "0.01633102", "4.70443515", 27781, 27781, T0, True)
    item = {"a": 26129, "p": "0.01633102", "q": "4.70443515", "f": 27781, "l": 27781, "T": T0, "m": True}
    payload = binance_layout("BTCUSDT", item)
    for raw in (
        json.dumps(payload).encode(),
        json.dumps({"stream": "btcusdt@aggTrade", "data": payload}).encode(),
        json.dumps({"stream": "btcusdt@aggTrade", "data": {k: v for k, v in payload.items() if k != "s"}}).encode(),
    ):
        decoder = TradesDecoder()
        assert decode_trades_value(raw, b"BTCUSDT") == TradeBatch("BTCUSDT", [trade])
        assert decoder.decode(raw, b"BTCUSDT") == TradeBatch("BTCUSDT", [trade]) and decoder.fast == 1
    reasons = {
        json.dumps({"stream": "ethusdt@aggTrade", "data": payload}): "data: field 's' (symbol) = 'BTCUSDT' does "
        "not match the stream's symbol 'ETHUSDT'",
        json.dumps({"stream": "btcusdt@trade", "data": payload}): "combined-stream envelope: stream "
        "'btcusdt@trade' is not an aggTrade stream",
        json.dumps({"stream": "btcusdt@aggTrade", "data": [payload]}): "combined-stream envelope: 'data' must be "
        "an object, got list",
        json.dumps({"data": payload}): "combined-stream envelope: 'stream' must be a string, got NoneType",
    }
    for raw_text, reason in reasons.items():
        assert verdict(decode_trades_value, raw_text.encode(), b"BTCUSDT") == "rejected: " + reason
        assert verdict(TradesDecoder().decode, raw_text.encode(), b"BTCUSDT") == "rejected: " + reason


@st.composite
def payload_slices(draw: st.DrawFn) -> list[tuple[bytes | None, bytes | None]]:
    """Records of one fetch as the engine's slice path sees them: Binance payloads of one layout, several
    symbols, and (usually) one record replaced by a broken or otherwise different one."""
    envelope = draw(st.booleans())
    out: list[tuple[bytes | None, bytes | None]] = []
    for _ in range(draw(st.integers(1, 6))):
        symbol = draw(st.sampled_from(["BTCUSDT", "ETHUSDT", "1000SHIBUSDT"]))
        payload = json.dumps(binance_layout(symbol, draw(trade_items())), separators=(",", ":"))
        raw = f'{{"stream":"{symbol.lower()}@aggTrade","data":{payload}}}' if envelope else payload
        out.append((raw.encode(), symbol.encode()))
    if draw(st.integers(0, 3)):
        out[draw(st.integers(0, len(out) - 1))] = draw(payload_records())
    return out


@settings(max_examples=800, deadline=None)
@given(payload_slices())
def test_a_slice_of_payloads_is_read_as_each_of_its_records_alone(
    records: list[tuple[bytes | None, bytes | None]],
) -> None:
    """The engine's slice path (:meth:`TradesDecoder.payloads`) accepts a slice only if every record is one
    payload that the record-by-record way reads the same, and whose checked trade the contract accepts."""
    assume(all(key is not None for _raw, key in records))
    values = [raw for raw, _key in records]
    symbols = [key.decode(errors="replace") for _raw, key in records if key is not None]
    decoder = TradesDecoder()
    payloads = decoder.payloads(values, symbols)
    if payloads is None:
        return
    assert decoder.fast == len(records)
    each = [TradesDecoder().items(raw, symbol) for raw, symbol in zip(values, symbols, strict=True)]
    assert each == [[payload] for payload in payloads]
    for (raw, key), payload in zip(records, payloads, strict=True):
        columns = TradesDecoder.checked([payload])
        expected = verdict(decode_trades_value, raw, key)
        if columns is None:
            continue  # the book refuses its price or quantity; the record loop then gives the contract's reason
        assert isinstance(expected, TradeBatch) and columns_of(expected.trades) == columns
