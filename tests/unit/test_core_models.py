"""The aggTrade parser (every rejection names its field) and the Kline payload / REST row round trips."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.models import AggTrade, InvalidInput, Kline, parse_agg_trade

pytestmark = pytest.mark.unit

# A genuine spot payload (Binance docs layout, real values).
SPOT = {
    "e": "aggTrade",
    "E": 1767225600040,
    "s": "BTCUSDT",
    "a": 3800397495,
    "p": "87648.21000000",
    "q": "0.08185000",
    "f": 5723703861,
    "l": 5723703861,
    "T": 1767225600039,
    "m": True,
    "M": True,
}


def test_parses_a_spot_payload() -> None:
    trade = parse_agg_trade(SPOT)
    assert trade == AggTrade("BTCUSDT", 3800397495, "87648.21000000", "0.08185000", 5723703861, 5723703861,
                             1767225600039, True)  # fmt: skip


def test_futures_payload_without_M_and_unknown_fields() -> None:
    payload = {k: v for k, v in SPOT.items() if k != "M"} | {"X": "MARKET", "nq": "1"}
    assert parse_agg_trade(payload).a == 3800397495


def test_symbol_may_come_from_the_stream() -> None:
    payload = {k: v for k, v in SPOT.items() if k != "s"}
    assert parse_agg_trade(payload, "btcusdt").s == "BTCUSDT"
    assert parse_agg_trade(SPOT, "BTCUSDT").s == "BTCUSDT"
    with pytest.raises(InvalidInput, match="does not match"):
        parse_agg_trade(SPOT, "ETHUSDT")
    with pytest.raises(InvalidInput, match="missing field 's'"):
        parse_agg_trade(payload)


def _with(**changes: Any) -> dict[str, Any]:
    payload = dict(SPOT)
    for key, value in changes.items():
        if value is ...:
            del payload[key]
        else:
            payload[key] = value
    return payload


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_with(a=...), r"missing field 'a' \(aggregate trade id\)"),
        (_with(p=...), r"missing field 'p' \(price\)"),
        (_with(q=...), r"missing field 'q' \(quantity\)"),
        (_with(T=...), r"missing field 'T'"),
        (_with(m=...), r"missing field 'm'"),
        (_with(f=...), r"missing field 'f'"),
        (_with(a="3800397495"), r"field 'a' .* must be an integer, got str"),
        (_with(a=True), r"field 'a' .* must be an integer, got bool"),
        (_with(a=1.0), r"field 'a' .* must be an integer, got float"),
        (_with(a=-1), r"field 'a' .* = -1 is outside"),
        (_with(p=87648.21), r"field 'p' \(price\) must be a decimal string, got float"),
        (_with(p="NaN"), r"field 'p' \(price\) = 'NaN' is not a plain decimal"),
        (_with(p="inf"), r"'inf' is not a plain decimal"),
        (_with(p="-1.5"), r"'-1.5' is not a plain decimal"),
        (_with(p="1e5"), r"'1e5' is not a plain decimal"),
        (_with(p="1.5.0"), r"is not a plain decimal"),
        (_with(p=" 1.5"), r"is not a plain decimal"),
        (_with(p="١٢"), r"is not a plain decimal"),
        (_with(p="0.00000000"), r"field 'p' \(price\) = '0.00000000' must be greater than zero"),
        (_with(q="0"), r"field 'q' \(quantity\) = '0' must be greater than zero"),
        (_with(q="1." + "1" * 19), r"at most 18 decimals"),
        (_with(f=10, l=9), r"first trade id f = 10 is greater than last trade id l = 9"),
        (_with(T=1_000_000_000_000), r"field 'T' .* outside"),  # 2001: far off
        (_with(T=1767225600039000), r"field 'T' .* outside"),  # microseconds
        (_with(m="true"), r"field 'm' .* must be true or false, got str"),
        (_with(e="trade"), r"field 'e' \(event type\) = 'trade', expected 'aggTrade'"),
        (_with(E="1"), r"field 'E' \(event time\) must be an integer"),
        (_with(s="BTC USDT"), r"field 's' \(symbol\) = 'BTC USDT' is not a symbol"),
        (_with(s=7), r"field 's' \(symbol\) must be a string, got int"),
    ],
)
def test_bad_payloads_are_rejected_with_a_specific_reason(payload: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason) as caught:
        parse_agg_trade(payload)
    assert caught.value.reason == str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("payload", [[], "x", None, 5, [("a", 1)]])
def test_non_objects_are_rejected(payload: Any) -> None:
    with pytest.raises(InvalidInput, match="must be a JSON object"):
        parse_agg_trade(payload)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
FIELD_VALUES = st.one_of(
    JSON_VALUES,
    st.sampled_from(list(SPOT.values())),
    st.integers(-(2**70), 2**70),
    st.from_regex(r"-?[0-9]{0,30}(\.[0-9]{0,25})?(e[0-9]+)?", fullmatch=True),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from([*SPOT, "x", "S"]), FIELD_VALUES, max_size=12),
    st.sampled_from([None, "BTCUSDT", "", "x y"]),
    st.booleans(),
)
def test_arbitrary_payloads_raise_nothing_but_invalid_input(
    payload: dict[str, Any], symbol: str | None, start_from_valid: bool
) -> None:
    if start_from_valid:
        payload = SPOT | payload
    try:
        trade = parse_agg_trade(payload, symbol)
    except InvalidInput as exc:
        assert exc.reason
        return
    assert Decimal(trade.p) > 0 and Decimal(trade.q) > 0 and trade.f <= trade.l
    assert type(trade.a) is int and type(trade.m) is bool


def sample_kline(**changes: Any) -> Kline:
    kline = Kline(
        s="BTCUSDT",
        i="1m",
        t=1767225600000,
        T=1767225659999,
        f=5723703861,
        L=5723705053,
        o=Decimal("87648.21000000"),
        h=Decimal("87648.22"),
        l=Decimal("87632.74"),
        c=Decimal("87648"),
        v=Decimal("4.08049"),
        n=1193,
        x=True,
        q=Decimal("357625.776862"),
        V=Decimal("1.79879"),
        Q=Decimal("157651.5149507"),
    )
    for key, value in changes.items():
        setattr(kline, key, value)
    return kline


def test_kline_payload_round_trip() -> None:
    kline = sample_kline(version=3, source="repaired")
    payload = kline.to_dict()
    assert list(payload) == ["t", "T", "s", "i", "f", "L", "o", "c", "h", "l", "v", "n", "x", "q", "V", "Q",
                             "version", "source"]  # fmt: skip
    assert payload["o"] == "87648.21000000" and payload["c"] == "87648" and payload["q"] == "357625.776862"
    again = Kline.from_dict(json.loads(json.dumps(payload)))
    assert again == kline
    assert again.to_dict() == payload


def test_decimals_are_written_without_exponent() -> None:
    kline = sample_kline(v=Decimal("1E+3"), V=Decimal("1E-8"), q=Decimal("0E-8"), Q=Decimal(0))
    payload = kline.to_dict()
    assert (payload["v"], payload["V"], payload["q"], payload["Q"]) == ("1000", "0.00000001", "0.00000000", "0")


def test_rest_row_order() -> None:
    row = sample_kline().to_rest_row()
    assert row == [1767225600000, "87648.21000000", "87648.22", "87632.74", "87648", "4.08049", 1767225659999,
                   "357625.776862", 1193, "1.79879", "157651.5149507", "0"]  # fmt: skip


def test_empty_kline_payload() -> None:
    kline = Kline.empty("BTCUSDT", "1m", 1767225660000, Decimal("87648"))
    assert kline.to_dict() == {
        "t": 1767225660000, "T": 1767225719999, "s": "BTCUSDT", "i": "1m", "f": -1, "L": -1,
        "o": "87648", "c": "87648", "h": "87648", "l": "87648", "v": "0", "n": 0, "x": True,
        "q": "0", "V": "0", "Q": "0", "version": 0, "source": "empty",
    }  # fmt: skip
    assert Kline.from_dict(kline.to_dict()) == kline


def test_same_values_compares_numerically_and_ignores_version() -> None:
    a = sample_kline()
    b = sample_kline(o=Decimal("87648.21"), version=7, source="repaired")
    assert a.same_values(b)
    assert a.differences(sample_kline(n=1, x=False)) == ["n", "x"]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"o": "1e5"}, r"field 'o' = '1e5' is not a plain non-negative decimal"),
        ({"v": -1}, r"field 'v' must be a decimal string, got int"),
        ({"q": 1.5}, r"field 'q' must be a decimal string, got float"),
        ({"h": "1"}, r"inconsistent prices"),
        ({"V": "5"}, r"taker-buy volume"),
        ({"i": "2m"}, r"field 'i' \(interval\): unknown interval"),
        ({"t": 1767225600001}, r"field 't' = 1767225600001 is not an open time"),
        ({"T": 1767225659998}, r"field 'T' = 1767225659998 is not the close time"),
        ({"x": "true"}, r"field 'x' \(closed\) must be true or false"),
        ({"n": -1}, r"field 'n' .* outside"),
        ({"source": "guess"}, r"field 'source' = 'guess' is not one of"),
        ({"version": -1}, r"field 'version' must be a non-negative integer"),
        ({"s": None}, r"field 's' \(symbol\) must be a string"),
    ],
)
def test_from_dict_rejects_bad_klines(changes: dict[str, Any], reason: str) -> None:
    payload = sample_kline().to_dict() | changes
    with pytest.raises(InvalidInput, match=reason):
        Kline.from_dict(payload)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list(sample_kline().to_dict())), FIELD_VALUES, max_size=6))
def test_from_dict_raises_nothing_but_invalid_input(changes: dict[str, Any]) -> None:
    try:
        Kline.from_dict(sample_kline().to_dict() | changes)
    except InvalidInput as exc:
        assert exc.reason
