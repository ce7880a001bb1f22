"""The frame parser: every Binance shape it must accept, and a fuzz proof that nothing crashes it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.models import AggTrade, parse_agg_trade
from services.ingest.frames import (
    ControlFrame,
    RejectedFrame,
    WireTrade,
    batch_value,
    parse_frame,
    stream_name,
    wire_trade,
)
from services.shared.messages import encode_trade_batch

pytestmark = pytest.mark.unit

PAYLOAD: dict[str, Any] = {
    "e": "aggTrade",
    "E": 1767225600123,
    "s": "BTCUSDT",
    "a": 26129,
    "p": "0.01633102",
    "q": "4.70443515",
    "f": 27781,
    "l": 27781,
    "T": 1767225600100,
    "m": True,
    "M": True,
}


def combined(data: Any, stream: Any = "btcusdt@aggTrade") -> str:
    return json.dumps({"stream": stream, "data": data})


def test_combined_frame_gives_the_trade() -> None:
    frame = parse_frame(combined(PAYLOAD))
    assert isinstance(frame, WireTrade) and (frame.s, frame.a) == ("BTCUSDT", 26129)
    t = frame.trade()
    assert (t.s, t.a, t.p, t.q, t.f, t.l, t.T, t.m) == (
        "BTCUSDT",
        26129,
        "0.01633102",
        "4.70443515",
        27781,
        27781,
        1767225600100,
        True,
    )


def test_bytes_and_raw_payloads_and_unknown_fields() -> None:
    expected = parse_frame(combined(PAYLOAD))
    assert parse_frame(combined(PAYLOAD).encode()) == expected
    assert parse_frame(json.dumps(PAYLOAD)) == expected
    futures = {k: v for k, v in PAYLOAD.items() if k != "M"} | {"x": "ignored", "nested": {"y": 1}}
    assert parse_frame(combined(futures)) == expected
    spaced = json.dumps({"stream": "btcusdt@aggTrade", "data": PAYLOAD}, indent=1).encode()
    assert parse_frame(spaced) == expected, "another layout: the general path, the same published fields"


def test_stream_name_is_lower_case() -> None:
    assert stream_name("BTCUSDT") == "btcusdt@aggTrade"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ('{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade"', "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        ("[1,2]", "expected a JSON object, got array"),
        ('"text"', "expected a JSON object, got string"),
        ("[" * 100_000 + "]" * 100_000, "not JSON"),
        (combined(PAYLOAD, stream=5), "'stream' must be a string"),
        (combined([1]), "'data' must be an object"),
        (combined(PAYLOAD, stream="btcusdt@trade"), "is not an aggTrade stream"),
        (combined(PAYLOAD, stream="btc-usdt@aggTrade"), "does not name a symbol"),
        (combined(PAYLOAD, stream="ethusdt@aggTrade"), "does not match the stream's symbol"),
        (combined({k: v for k, v in PAYLOAD.items() if k != "p"}), "missing field 'p'"),
        (combined(PAYLOAD | {"a": "26129"}), "field 'a'"),
        (combined(PAYLOAD | {"q": 4.7}), "field 'q'"),
        (combined(PAYLOAD | {"p": "-0.1"}), "not a plain decimal"),
        (combined(PAYLOAD | {"p": "0"}), "greater than zero"),
        (combined(PAYLOAD | {"p": "NaN"}), "not a plain decimal"),
        (combined(PAYLOAD | {"T": 5}), "field 'T'"),
        (combined(PAYLOAD | {"f": 10, "l": 9}), "greater than last trade id"),
        (combined(PAYLOAD | {"e": "trade"}), "expected 'aggTrade'"),
        (json.dumps({"e": "depthUpdate"}), "unexpected event type"),
        (json.dumps({"hello": 1}), "unrecognised frame"),
    ],
)
def test_rejections_carry_a_reason(raw: str | bytes, reason: str) -> None:
    frame = parse_frame(raw)
    assert isinstance(frame, RejectedFrame), frame
    assert reason in frame.reason


def test_rejection_names_the_symbol_when_known() -> None:
    frame = parse_frame(combined(PAYLOAD | {"p": "-1"}))
    assert isinstance(frame, RejectedFrame) and frame.symbol == "BTCUSDT"


def test_control_frames() -> None:
    assert parse_frame('{"result":null,"id":3}') == ControlFrame("reply", 3)
    error = parse_frame('{"error":{"code":2,"msg":"Invalid request"},"id":4}')
    assert isinstance(error, ControlFrame) and error.kind == "error" and "Invalid request" in error.detail
    for raw in (
        '{"e":"serverShutdown","E":1767225600000}',
        '{"event":{"e":"serverShutdown","E":1}}',
        combined({"e": "serverShutdown", "E": 1}),
    ):
        frame = parse_frame(raw)
        assert isinstance(frame, ControlFrame) and frame.kind == "server_shutdown", raw


def _check(frame: object) -> None:
    assert isinstance(frame, WireTrade | ControlFrame | RejectedFrame)
    if isinstance(frame, RejectedFrame):
        assert isinstance(frame.reason, str) and frame.reason.strip()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_never_crash(raw: bytes) -> None:
    _check(parse_frame(raw))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text_never_crash(raw: str) -> None:
    _check(parse_frame(raw))


_scalar = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**18, max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.from_regex(r"-?[0-9]{0,3}(\.[0-9]{0,20})?([eE][0-9])?", fullmatch=True)
)
_json = _scalar | st.lists(_scalar, max_size=3) | st.dictionaries(st.text(max_size=3), _scalar, max_size=3)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(PAYLOAD)), _json, max_size=len(PAYLOAD)), st.booleans())
def test_fuzz_mutated_payloads_are_valid_trades_or_rejected_with_reason(mutation: dict[str, Any], wrap: bool) -> None:
    data = PAYLOAD | mutation
    frame = parse_frame(combined(data) if wrap else json.dumps(data))
    _check(frame)
    if isinstance(frame, WireTrade):  # whatever was accepted is a sane trade
        t = frame.trade()
        assert (t.s, t.a) == (frame.s, frame.a)
        assert t.a >= 0 and t.f <= t.l
        assert float(t.p) > 0 and float(t.q) > 0
        if wrap:
            assert t.s == "BTCUSDT", "the stream's symbol and the payload's agree"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), st.integers(min_value=0, max_value=200))
def test_fuzz_corrupted_real_frames(noise: bytes, at: int) -> None:
    raw = combined(PAYLOAD).encode()
    at = min(at, len(raw))
    _check(parse_frame(raw[:at] + noise + raw[at + len(noise) :]))


# --------------------------------------------------------------------------------------------------- fast path

_digits = st.text(alphabet="0123456789", min_size=0, max_size=26)
_number = st.one_of(
    st.integers(min_value=0, max_value=10**6).map(str),
    st.integers(min_value=1_262_304_000_000, max_value=4_102_444_800_000).map(str),
    st.integers(min_value=-3, max_value=2**63 + 3).map(str),
    st.sampled_from(
        [
            "1262303999999",
            "4102444800001",
            "9223372036854775807",
            "9223372036854775808",
            "-0",
            "007",
            "1e5",
            "1.0",
            "12345678901234567890123",
        ]
    ),
)
_decimal = st.one_of(
    st.builds(lambda i, f: f"{i}.{f}" if f else i, _digits, st.text(alphabet="0123456789", max_size=20)),
    st.sampled_from(["0", "0.000", "00.10", "1.", ".5", "1e3", "NaN", "-1.5", "87650.12000000", "0.00400000"]),
)
_symbol = st.sampled_from(["BTCUSDT", "btcusdt", "ETHUSDT", "BTC_USDT", "B" * 41, "", "BTCUSDT "])
_boolean = st.sampled_from(["true", "false", "1", "null", '"true"'])


def _layout(
    name: str, s: str, e: str, big_e: str, a: str, p: str, q: str, f: str, last: str, t: str, m: str, tail: str
) -> bytes:
    return (
        f'{{"stream":"{name}@aggTrade","data":{{"e":"{e}","E":{big_e},"s":"{s}","a":{a},"p":"{p}","q":"{q}",'
        f'"f":{f},"l":{last},"T":{t},"m":{m}{tail}}}}}'
    ).encode()


_valid_decimal = st.builds(
    lambda i, f: f"{i}.{f}" if f else i,
    st.text(alphabet="0123456789", min_size=1, max_size=24),
    st.text(alphabet="0123456789", max_size=18),
).filter(lambda d: d.strip("0.") != "")
_FIELDS = ("name", "s", "e", "big_e", "a", "p", "q", "f", "last", "t", "m", "tail")


@st.composite
def _valid_frame(draw: st.DrawFn) -> dict[str, str]:
    name = draw(st.sampled_from(["btcusdt", "ethusdt", "1000pepeusdt", "x"]))
    f = draw(st.integers(min_value=0, max_value=2**63 - 1))
    return {
        "name": name,
        "s": name.upper(),
        "e": "aggTrade",
        "big_e": str(draw(st.integers(min_value=0, max_value=2**63 - 1))),
        "a": str(draw(st.integers(min_value=0, max_value=2**63 - 1))),
        "p": draw(_valid_decimal),
        "q": draw(_valid_decimal),
        "f": str(f),
        "last": str(draw(st.integers(min_value=f, max_value=2**63 - 1))),
        "t": str(draw(st.integers(min_value=1_262_304_000_000, max_value=4_102_444_800_000))),
        "m": draw(st.sampled_from(["true", "false"])),
        "tail": draw(st.sampled_from(["", ',"M":true', ',"M":false'])),
    }


_mutation = st.one_of(_number, _decimal, _symbol, _boolean, st.sampled_from(["", ',"M":1', ',"x":1', ', "M":true']))


@settings(max_examples=300, deadline=None)
@given(frame=_valid_frame(), mutations=st.dictionaries(st.sampled_from(_FIELDS), _mutation, max_size=2))
def test_fast_path_agrees_with_parse_agg_trade(frame: dict[str, str], mutations: dict[str, str]) -> None:
    """Binance-layout frames, valid or with one or two fields broken: whenever the shortcut accepts a frame,
    the general path (json.loads + parse_agg_trade) accepts it too and returns the very same trade."""
    from services.ingest.frames import fast_trade, parse_frame_general

    raw = _layout(*(mutations.get(k, frame[k]) for k in _FIELDS))
    fast = fast_trade(raw)
    general = parse_frame_general(raw)
    if fast is not None:
        assert general == fast  # the same symbol, id and published bytes
        assert fast.trade() == parse_agg_trade(json.loads(raw)["data"])
    elif not mutations:
        raise AssertionError(f"a valid Binance frame missed the fast path: {raw!r}")
    assert parse_frame(raw) == general


def test_fast_path_takes_binance_frames() -> None:
    from services.ingest.frames import fast_trade

    spot = _layout(
        "btcusdt",
        "BTCUSDT",
        "aggTrade",
        "1767225600123",
        "26129",
        "0.01633102",
        "4.70443515",
        "27781",
        "27781",
        "1767225600100",
        "true",
        ',"M":true',
    )
    futures = _layout(
        "trxusdt", "TRXUSDT", "aggTrade", "1767225600123", "0", "0.28", "800", "0", "3", "1767225600100", "false", ""
    )
    btc = AggTrade("BTCUSDT", 26129, "0.01633102", "4.70443515", 27781, 27781, 1767225600100, True)
    trx = AggTrade("TRXUSDT", 0, "0.28", "800", 0, 3, 1767225600100, False)
    assert fast_trade(spot) == wire_trade(btc)
    assert fast_trade(futures) == wire_trade(trx)


# ------------------------------------------------------------------------------- the published bytes


_trade = st.builds(
    AggTrade,
    st.sampled_from(["BTCUSDT", "1000PEPEUSDT", "X"]),
    st.integers(min_value=0, max_value=2**63 - 1),
    _valid_decimal,
    _valid_decimal,
    st.integers(min_value=0, max_value=2**62),
    st.integers(min_value=2**62, max_value=2**63 - 1),
    st.integers(min_value=1_262_304_000_000, max_value=4_102_444_800_000),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_trade, min_size=1, max_size=5))
def test_batches_from_wire_trades_are_the_topics_own_encoding(trades: list[AggTrade]) -> None:
    """Ingest builds batch records from each trade's published fields; they are byte for byte what the
    ``trades`` contract's encoder (services.shared.messages) writes, and the fields read back as the trade."""
    symbol = trades[0].s
    trades = [AggTrade(symbol, *dataclasses.astuple(t)[1:]) for t in trades]
    wire = [wire_trade(t) for t in trades]
    assert batch_value(symbol.encode(), [w.fields for w in wire]) == encode_trade_batch(symbol, trades)
    assert [w.trade() for w in wire] == trades
    assert [(w.s, w.a) for w in wire] == [(t.s, t.a) for t in trades]


@settings(max_examples=200, deadline=None)
@given(_valid_frame())
def test_fast_path_fields_are_the_encoders_bytes(frame: dict[str, str]) -> None:
    """A frame in Binance's layout is published as a slice of itself: the same bytes the encoder would write."""
    from services.ingest.frames import fast_trade

    raw = _layout(*(frame[k] for k in _FIELDS))
    fast = fast_trade(raw)
    assert fast is not None
    trade = parse_agg_trade(json.loads(raw)["data"])
    assert batch_value(trade.s.encode(), [fast.fields]) == encode_trade_batch(trade.s, [trade])
