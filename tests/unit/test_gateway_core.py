"""The gateway's pure parts: the board's publish decision, the coalescing outbox, the rate limit, the protocol."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core.intervals import close_time
from services.core.models import InvalidInput, Kline
from services.gateway.board import KlineBoard, Update, merge_for_subscribe
from services.gateway.outbox import Offer, Outbox, TokenBucket
from services.gateway.protocol import (
    Catalog,
    ProtocolError,
    decode_record,
    kline_event,
    parse_request,
    streams_from_url,
)

pytestmark = pytest.mark.unit

KEY, STREAM = "BTCUSDT|1m", "btcusdt@kline_1m"


def upd(t: int, *, final: bool = False, version: int = 0, seq: int | None = None) -> Update:
    return Update(STREAM, KEY, t, final, version, seq, f"{t}/{final}/{version}/{seq}", 0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- board ---------------------------------------------------------------------------------------------------


def test_board_orders_snapshots_and_finals_of_one_key() -> None:
    board = KlineBoard(recent_klines=2)
    assert board.apply(upd(0, seq=1))
    assert board.apply(upd(0, seq=2))
    assert not board.apply(upd(0, seq=2)), "repeated snapshot"
    assert not board.apply(upd(0, seq=1)), "older snapshot"
    assert board.apply(upd(60, seq=3)), "next minute began before the final of minute 0 arrived"
    assert board.apply(upd(0, final=True)), "the late final of minute 0 is still news"
    assert board.current(KEY) == upd(60, seq=3), "but it does not replace the newer current kline"
    assert not board.apply(upd(0, final=True)), "duplicate final"
    assert not board.apply(upd(0, seq=4)), "snapshot of a closed minute"
    assert board.apply(upd(0, final=True, version=1)), "a correction"
    assert board.apply(upd(60, final=True))
    assert not board.apply(upd(60, seq=5)), "snapshot after its final"
    assert board.apply(upd(0, final=True, version=2)), "correction of an older kline"
    assert not board.apply(upd(0, final=True, version=2))
    assert [u.t for u in board.recent(KEY)] == [0, 60]
    assert board.recent(KEY)[0].version == 2


def test_merge_for_subscribe_prefers_the_most_advanced_update_per_open_time() -> None:
    board = KlineBoard()
    board.apply(upd(120, final=True, version=1))
    board.apply(upd(180, seq=9))
    history = [upd(60, final=True), upd(120, final=True)]  # ClickHouse lags: version 0 of minute 2
    merged = merge_for_subscribe(history, board, KEY)
    assert [(u.t, u.final, u.version) for u in merged] == [(60, True, 0), (120, True, 1), (180, False, 0)]


@given(st.permutations(list(range(12))))
def test_board_delivers_every_final_once_whatever_the_interleaving(order: list[int]) -> None:
    # Per minute: two snapshots (increasing seq) then a final; topics interleave, snapshots keep their order.
    updates = []
    for m in range(4):
        updates += [upd(m * 60, seq=2 * m + 1), upd(m * 60, seq=2 * m + 2), upd(m * 60, final=True)]
    snapshots = [u for u in updates if not u.final]
    finals = [u for u in updates if u.final]
    # Merge the two ordered topics according to the permutation's parity pattern.
    merged, si, fi = [], 0, 0
    for index in order:
        take_final = index % 3 == 2
        if (take_final and fi < len(finals)) or si >= len(snapshots):
            merged.append(finals[fi])
            fi += 1
        else:
            merged.append(snapshots[si])
            si += 1
    merged += snapshots[si:] + finals[fi:]
    board = KlineBoard()
    delivered = [u for u in merged if board.apply(u)]
    assert sorted(u.t for u in delivered if u.final) == [0, 60, 120, 180]
    live = [u for u in delivered if not u.final]
    assert [u.seq for u in live] == sorted(u.seq or 0 for u in live), "snapshots never go backwards"
    assert board.current(KEY) == finals[-1]


# -- outbox --------------------------------------------------------------------------------------------------


def test_outbox_coalesces_per_slot_keeps_order_and_age() -> None:
    clock = Clock()
    box = Outbox(3, clock)
    assert box.offer(("s", 0), "a0", 1) is Offer.QUEUED
    clock.now = 1.0
    assert box.offer(("s", 60), "b0", 2) is Offer.QUEUED
    assert box.offer(("s", 0), "a1", 3) is Offer.COALESCED
    assert box.offer_control("reply") is Offer.QUEUED
    assert box.offer(("s", 120), "c0") is Offer.OVERFLOW
    clock.now = 2.5
    assert box.oldest_age() == 2.5, "a coalesced slot keeps its first enqueue time"
    assert [box.pop(), box.pop(), box.pop(), box.pop()] == [("a1", 3, 2.5), ("b0", 2, 1.5), ("reply", 0, 1.5), None]
    assert box.oldest_age() == 0.0


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1000)), max_size=60), st.integers(1, 4))
def test_outbox_never_exceeds_capacity_and_latest_wins(offers: list[tuple[int, int]], capacity: int) -> None:
    box = Outbox(capacity, Clock())
    expected: dict[int, int] = {}
    for slot, value in offers:
        result = box.offer(slot, str(value))
        if result is not Offer.OVERFLOW:
            expected[slot] = value
        assert len(box) <= capacity
    popped = []
    while (item := box.pop()) is not None:
        popped.append(int(item[0]))
    assert popped == list(expected.values())


def test_token_bucket_allows_the_rate_and_a_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(5, 5, clock)
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
    clock.now = 0.2
    assert bucket.take() and not bucket.take()


# -- protocol ------------------------------------------------------------------------------------------------

CATALOG = Catalog(("1m", "1M", "1h"), {"BTCUSDT", "ETHUSDT"})


def test_subscribe_request_and_stream_names() -> None:
    request = parse_request(
        '{"method":"SUBSCRIBE","params":["btcusdt@kline_1m","BTCUSDT@kline_1M","btcusdt@kline_1m"],"id":7}',
        CATALOG,
        history_limit=10,
    )
    assert request.method == "SUBSCRIBE" and request.id == 7 and request.history == 0
    assert [s.name for s in request.streams] == ["btcusdt@kline_1m", "btcusdt@kline_1M"]
    assert [s.key for s in request.streams] == ["BTCUSDT|1m", "BTCUSDT|1M"]
    assert [s.name for s in streams_from_url("ethusdt@kline_1h", {"streams": "btcusdt@kline_1m/"}, CATALOG)] == [
        "ethusdt@kline_1h",
        "btcusdt@kline_1m",
    ]


@pytest.mark.parametrize(
    ("text", "code", "fragment"),
    [
        ("nope", 3, "Invalid JSON"),
        ('{"method":"SUBSCRIBE","params":["btcusdt@kline_1m"],"id":1.5}', 2, "'id' must be"),
        ('{"method":"SUBSCRIBE","params":["btcusdt@kline_5m"],"id":1}', 2, "unknown interval '5m'"),
        ('{"method":"SUBSCRIBE","params":["btcusdt@kline_1m"],"id":1,"history":11}', 4, "more than this gateway"),
        ('{"method":"UNSUBSCRIBE","params":["btcusdt@kline_1m"],"id":1,"history":1}', 2, "SUBSCRIBE only"),
        ('{"method":"LIST_SUBSCRIPTIONS","params":["x"],"id":1}', 2, "takes no params"),
        ('{"method":"SUBSCRIBE","params":["btcusdt@depth"],"id":1}', 2, "unsupported stream"),
    ],
)
def test_bad_requests(text: str, code: int, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(text, CATALOG, history_limit=10)
    assert info.value.code == code and fragment in info.value.msg
    reply = json.loads(info.value.reply())
    assert reply["error"] == {"code": code, "msg": info.value.msg}


def test_kline_event_is_binance_shaped() -> None:
    t = 1_767_225_600_000
    k = Kline(
        "BTCUSDT", "1m", t, close_time("1m", t), 5, 9, Decimal("1.10"), Decimal("2"), Decimal("1"),
        Decimal("1.5"), Decimal("3.00000000"), 5, True, Decimal("4.5"), Decimal("1"), Decimal("1.5"),
    )  # fmt: skip
    event = json.loads(kline_event(k, 123))
    assert event == {
        "e": "kline",
        "E": 123,
        "s": "BTCUSDT",
        "k": {
            "t": t, "T": t + 59_999, "s": "BTCUSDT", "i": "1m", "f": 5, "L": 9, "o": "1.10", "c": "1.5", "h": "2",
            "l": "1", "v": "3.00000000", "n": 5, "x": True, "q": "4.5", "V": "1", "Q": "1.5", "B": "0",
        },
    }  # fmt: skip


def _encoded(**changes: object) -> bytes:
    t = 1_767_225_600_000
    k = Kline(
        "BTCUSDT", "1m", t, close_time("1m", t), 5, 9, Decimal("1.10"), Decimal("2"), Decimal("1"),
        Decimal("1.5"), Decimal("3.00000000"), 5, False, Decimal("4.5"), Decimal("1"), Decimal("1.5"), version=2,
    )  # fmt: skip
    d = {**k.to_dict(), "seq": 7, **changes}
    return json.dumps({key: value for key, value in d.items() if value is not None}, separators=(",", ":")).encode()


def test_decode_record_fast_and_general_paths_agree_with_the_full_decoder() -> None:
    from services.shared.messages import decode_kline

    raw = _encoded()
    kline, seq = decode_kline(raw)
    fast = decode_record(raw)
    assert (fast.symbol, fast.interval, fast.t, fast.final, fast.version, fast.seq) == (
        "BTCUSDT",
        "1m",
        kline.t,
        False,
        2,
        7,
    )
    assert fast.event(99) == kline_event(kline, 99)
    reordered = json.dumps(dict(reversed(json.loads(raw).items()))).encode()  # not encode_kline's bytes
    general = decode_record(reordered)
    assert general.event(99) == fast.event(99) and general.seq == seq


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"o": None}, "missing field 'o'"),
        ({"o": "NaN"}, "not a plain decimal"),
        ({"c": '1","x":"y'}, "not a plain decimal"),
        ({"v": 3}, "not a plain decimal"),
        ({"s": 'BTC"USDT'}, "not a symbol"),
        ({"i": "2m"}, "not an interval"),
        ({"t": 1_767_225_600_001}, "not an open and close time"),
        ({"n": "5"}, "must be an integer"),
        ({"x": 1}, "true or false"),
        ({"seq": -1}, "'seq'"),
    ],
)
def test_decode_record_rejects_what_it_must_not_forward(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_record(_encoded(**changes))
    assert fragment in info.value.reason


@pytest.mark.parametrize(
    ("dsn", "history", "recent", "expected"),
    [
        ("chdb:///tmp/x", "auto", 120, "memory"),  # embedded: the writers' process owns the directory
        ("chdb:///tmp/x", "auto", 0, "none"),
        ("chdb:///tmp/x", "on", 120, "clickhouse"),  # nobody else has it open (a demo, a test)
        ("http://clickhouse:8123", "auto", 120, "clickhouse"),
        ("http://clickhouse:8123", "off", 120, "memory"),
    ],
)
def test_history_source(dsn: str, history: str, recent: int, expected: str) -> None:
    from services.gateway.history import history_source
    from services.shared.settings import load_settings

    settings = load_settings(clickhouse={"dsn": dsn}, gateway={"history": history, "recent_klines": recent})
    assert history_source(settings) == expected
