"""The frame parser: every Binance shape it must accept, and a fuzz proof that nothing crashes it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest.frames import ControlFrame, RejectedFrame, TradeFrame, parse_frame, stream_name

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
    assert isinstance(frame, TradeFrame)
    t = frame.trade
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
    assert isinstance(parse_frame(combined(PAYLOAD).encode()), TradeFrame)
    assert isinstance(parse_frame(json.dumps(PAYLOAD)), TradeFrame)
    futures = {k: v for k, v in PAYLOAD.items() if k != "M"} | {"x": "ignored", "nested": {"y": 1}}
    assert isinstance(parse_frame(combined(futures)), TradeFrame)


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
    assert isinstance(frame, TradeFrame | ControlFrame | RejectedFrame)
    if isinstance(frame, RejectedFrame):
        assert isinstance(frame.reason, str) and frame.reason.strip()


@settings(max_examples=400, deadline=None)
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


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(PAYLOAD)), _json, max_size=len(PAYLOAD)), st.booleans())
def test_fuzz_mutated_payloads_are_valid_trades_or_rejected_with_reason(mutation: dict[str, Any], wrap: bool) -> None:
    data = PAYLOAD | mutation
    frame = parse_frame(combined(data) if wrap else json.dumps(data))
    _check(frame)
    if isinstance(frame, TradeFrame):  # whatever was accepted is a sane trade
        t = frame.trade
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
