"""The writers' kline decoder: the fast path and the full path accept exactly the same values.

:func:`decode_kline_record` reads what :func:`encode_kline` writes with msgspec and one compiled pattern, and
leaves everything else to the full path (``json.loads`` + :meth:`Kline.from_dict`). The properties: on valid
input both paths build the same kline (and the fast path is the one taken for the canonical layout, carrying the
decimals exactly as sent); on anything else the outcome is the full path's, the same kline or the same specific
rejection.
"""

from __future__ import annotations

import json
from decimal import Context, Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.intervals import INTERVALS, close_time, open_time
from services.core.models import KLINE_SOURCES, MAX_ID, InvalidInput, Kline
from services.shared.clickhouse import DECIMAL_INTEGER_DIGITS, DECIMAL_SCALE, decimal_text, kline_text
from services.shared.messages import (
    _decode_kline_fully,
    decode_kline,
    decode_kline_record,
    decode_kline_run,
    encode_kline,
)

pytestmark = pytest.mark.unit

T0 = 1_735_689_600_000  # 2025-01-01 00:00 UTC
EXACT = Context(prec=60)


@st.composite
def decimals(draw: st.DrawFn, *, positive: bool = False, max_int_digits: int = DECIMAL_INTEGER_DIGITS) -> Decimal:
    """Exact decimals with 0..18 fraction digits and up to 20 integer digits (what Decimal(38, 18) holds)."""
    scale = draw(st.integers(0, DECIMAL_SCALE))
    top = 10 ** (max_int_digits + scale) - 1
    return Decimal(draw(st.integers(1 if positive else 0, top))).scaleb(-scale, context=EXACT)  # no rounding


@st.composite
def klines(draw: st.DrawFn) -> Kline:
    interval = draw(st.sampled_from(INTERVALS))
    t = open_time(interval, draw(st.integers(T0, T0 + 10 * 365 * 86_400_000)))
    prices = sorted(draw(st.lists(decimals(positive=True, max_int_digits=8), min_size=4, max_size=4)))
    low, high = prices[0], prices[3]
    o, c = draw(st.permutations(prices[1:3]))
    v, q = draw(decimals()), draw(decimals())
    taker_v = min(v, draw(decimals()))
    taker_q = min(q, draw(decimals()))
    first = draw(st.integers(-1, MAX_ID))
    return Kline(
        draw(st.from_regex(r"[A-Z0-9][A-Z0-9_]{0,39}", fullmatch=True)),
        interval,
        t,
        close_time(interval, t),
        first,
        draw(st.integers(-1, MAX_ID)),
        o,
        high,
        low,
        c,
        v,
        draw(st.integers(0, MAX_ID)),
        draw(st.booleans()),
        q,
        taker_v,
        taker_q,
        draw(st.integers(0, MAX_ID)),
        draw(st.sampled_from(sorted(KLINE_SOURCES))),
    )


seqs = st.none() | st.integers(0, MAX_ID)


def outcome(decode: Any, raw: bytes | None) -> tuple[str, Any]:
    """What a decoder made of ``raw``: the kline and seq, or the rejection's reason."""
    try:
        kline, seq = decode(raw)[:2]
    except InvalidInput as exc:
        return ("rejected", exc.reason)
    return ("accepted", (kline, seq))


@given(klines(), seqs)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_what_encode_kline_writes_takes_the_fast_path_and_agrees_with_the_full_path(
    kline: Kline, seq: int | None
) -> None:
    raw = encode_kline(kline, seq)
    record = decode_kline_record(raw)
    assert record.decimals is not None, "the canonical layout must take the fast path"
    assert (record.kline, record.seq) == _decode_kline_fully(raw)
    assert record.kline == kline and record.seq == seq
    # The decimals are the text that was sent, and exactly the text a writer would make of the kline.
    sent = json.loads(raw)
    assert record.decimals == tuple(sent[k] for k in ("o", "h", "l", "c", "v", "q", "V", "Q"))
    assert record.decimals == tuple(decimal_text(getattr(kline, k)) for k in ("o", "h", "l", "c", "v", "q", "V", "Q"))
    assert record.text == kline_text(kline)  # what a writer stores: the same as it would make of the kline
    assert decode_kline(raw) == (kline, seq)
    # Built by hand for speed, yet byte for byte what the generic encoder writes of the kline's dict.
    payload = kline.to_dict() | ({} if seq is None else {"seq": seq})
    assert raw == json.dumps(payload, separators=(",", ":")).encode()


@given(klines(), seqs, st.randoms(use_true_random=False))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_other_layouts_of_valid_values_decode_to_the_same_kline(kline: Kline, seq: int | None, rnd: Any) -> None:
    payload: dict[str, Any] = kline.to_dict()
    if seq is not None:
        payload["seq"] = seq
    items = list(payload.items())
    rnd.shuffle(items)
    raw = json.dumps(dict(items), indent=rnd.choice([None, 1]), ensure_ascii=rnd.choice([True, False])).encode()
    assert outcome(decode_kline_record, raw) == ("accepted", (kline, seq))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-1, 2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.from_regex(r"[+-]?0*[0-9]{0,25}(\.[0-9]{0,25})?([eE][+-]?[0-9]{1,3})?", fullmatch=True)
    | st.sampled_from(
        ["NaN", "Infinity", "1_000", " 1", "1 ", "١٢", "0.", ".5", "00", "1e5", "-0", "BTCUSDT", "btcusdt"]
    ),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
field_names = st.sampled_from([*Kline.__dataclass_fields__, "seq", "T", "L", "V", "Q", "extra"])


@given(klines(), seqs, st.lists(st.tuples(field_names, st.one_of(st.just("<delete>"), json_values)), max_size=3))
@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
def test_changed_fields_get_the_full_paths_outcome(kline: Kline, seq: int | None, changes: list[Any]) -> None:
    payload: dict[str, Any] = kline.to_dict()
    if seq is not None:
        payload["seq"] = seq
    for name, value in changes:
        if value == "<delete>":
            payload.pop(name, None)
        else:
            payload[name] = value
    raw = json.dumps(payload, separators=(",", ":")).encode()
    assert outcome(decode_kline_record, raw) == outcome(_decode_kline_fully, raw)


@given(st.binary(max_size=400) | st.builds(lambda k, cut: encode_kline(k)[:cut], klines(), st.integers(0, 400)))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_bytes_get_the_full_paths_outcome(raw: bytes) -> None:
    assert outcome(decode_kline_record, raw) == outcome(_decode_kline_fully, raw)


def canonical(**changes: Any) -> bytes:
    t = T0
    k = Kline("BTCUSDT", "1m", t, t + 59_999, 1, 2, Decimal("1"), Decimal("2"), Decimal("1"), Decimal("1.5"),
              Decimal("3"), 3, True, Decimal("4"), Decimal("1"), Decimal("1"))  # fmt: skip
    payload = {**k.to_dict(), **changes}
    return json.dumps(payload, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty record"),
        (b"{", "not JSON"),
        (b'{"t":1,"x":"\xff"}', "not JSON"),  # invalid UTF-8 that msgspec alone would skip in an unknown field
        (canonical(o="1e5"), "field 'o' = '1e5' is not a plain non-negative decimal string"),
        (canonical(h="0.5"), "inconsistent prices"),
        (canonical(V="4"), "taker-buy volume V/Q exceeds total volume v/q"),
        (canonical(t=T0 + 1), "is not an open time of interval '1m'"),
        (canonical(T=T0), "is not the close time"),
        (canonical(n=True), "field 'n' (kline integer) must be an integer, got bool"),
        (canonical(f=-2), "field 'f' (kline integer) = -2 is outside"),
        (canonical(i="2m"), "field 'i' (interval): unknown interval '2m'"),
        (canonical(source="guess"), "field 'source' = 'guess' is not one of"),
        (canonical(seq=-1), "'seq' must be a non-negative integer"),
        (canonical(s="BTC USDT"), "field 's' (symbol) = 'BTC USDT' is not a symbol"),
    ],
)
def test_bad_values_are_rejected_with_the_full_paths_specific_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_kline_record(raw)
    assert reason in info.value.reason


@pytest.mark.parametrize(
    "raw",
    [
        canonical(s="btcusdt"),  # lower case: the full path upper-cases it
        canonical(v=3),  # a decimal sent as a JSON integer
        canonical(q="4.0000000000000000000"),  # more decimals than the table keeps (zeros)
        canonical(version=2**63),  # beyond what the fast path's bounds hold
        canonical(o="01"),  # a leading zero
    ],
)
def test_unusual_but_valid_values_are_accepted_by_the_full_path(raw: bytes) -> None:
    record = decode_kline_record(raw)
    assert record.decimals is None
    assert (record.kline, record.seq) == _decode_kline_fully(raw)


def test_a_record_whose_decimals_do_not_fit_the_table_is_left_to_the_full_path() -> None:
    many = "0." + "1" * 19  # 19 decimals: a valid kline, which the writer then refuses (Decimal(38, 18))
    record = decode_kline_record(canonical(v=many, q=many, V="0", Q="0"))
    assert record.decimals is None and record.kline.v == Decimal(many)


def test_values_are_kept_exactly() -> None:
    big = "99999999999999999999.999999999999999999"
    record = decode_kline_record(canonical(v=big, q=big, V="0.000000000000000001", Q="12345678901234567890.5"))
    assert record.decimals is not None
    assert record.decimals[4:] == (big, big, "0.000000000000000001", "12345678901234567890.5")
    assert record.kline.v == Decimal(big)


@st.composite
def changed_values(draw: st.DrawFn) -> bytes | None:
    """A canonical value, often with a field or two changed (valid or not), now and then something else."""
    kline, seq = draw(klines()), draw(seqs)
    shape = draw(st.sampled_from(["canonical"] * 4 + ["changed"] * 4 + ["bytes", "none"]))
    if shape == "none":
        return None
    if shape == "bytes":
        return draw(st.binary(max_size=60))
    payload: dict[str, Any] = kline.to_dict()
    if seq is not None:
        payload["seq"] = seq
    if shape == "changed":
        for name, value in draw(st.lists(st.tuples(field_names, json_values), min_size=1, max_size=2)):
            payload[name] = value
    return json.dumps(payload, separators=(",", ":")).encode()


@given(st.lists(changed_values(), max_size=5))
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_a_run_is_decoded_at_once_exactly_when_every_value_takes_the_fast_path(values: list[bytes | None]) -> None:
    """Writers decode a fetched run at once (decode_kline_run): the same verdict and fields as one by one."""
    singles = []
    for raw in values:
        try:
            singles.append(decode_kline_record(raw))
        except InvalidInput:
            singles.append(None)
    every_value_fast = all(record is not None and record.text is not None for record in singles)
    run = decode_kline_run(values)
    assert (run is not None) == every_value_fast
    if run is not None:
        wires, texts = run
        for wire, text, record in zip(wires, texts, singles, strict=True):
            assert record is not None
            k = record.kline
            assert text == record.text and wire.seq == record.seq
            assert (wire.s, wire.i, wire.t, wire.T, wire.f, wire.L, wire.n, wire.x, wire.version, wire.source) == (
                k.s, k.i, k.t, k.T, k.f, k.L, k.n, k.x, k.version, k.source
            )  # fmt: skip
