"""Every rejection names its reason category, the category matches what was wrong, and dead letters carry it.

The categories (:data:`~services.core.models.ReasonCategory`) label ``dead_letters_by_reason`` in Prometheus, so
each raise site must say which one it is rather than fall back to the default: a scan of the source holds that,
and a table of bad inputs, read by every decoder that dead-letters, holds that the category is the right one.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from services.aggregator.decode import TradesDecoder
from services.core.book import KlineBook
from services.core.models import REASON_CATEGORIES, AggTrade, InvalidInput, Kline
from services.ingest.frames import RejectedFrame, parse_frame, parse_frame_general
from services.shared.messages import dead_letter_value, decode_kline_record, decode_trades_value
from services.writers.batch import check_fits_table
from services.writers.specs import finalized_version, snapshot_version

pytestmark = pytest.mark.unit

SERVICES = Path(__file__).resolve().parents[2] / "services"
#: Modules whose InvalidInput never becomes a dead letter, so they may leave the category to its default: the
#: gateway skips a record it cannot read (and counts it), the reference loader fails a verification run.
NO_DEAD_LETTERS = {"gateway/protocol.py", "core/reference.py"}
#: Where each constructor of a rejection takes its category: (positional index, keyword).
CATEGORY_ARGUMENT = {
    "InvalidInput": (1, "category"),
    "RejectedFrame": (1, "category"),
    "RejectedTrade": (2, "category"),
    "dead_letter_value": (None, "category"),
}


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in CATEGORY_ARGUMENT:
                found.append((name, node))
    return found


def _category(name: str, call: ast.Call) -> ast.expr | None:
    position, keyword = CATEGORY_ARGUMENT[name]
    if position is not None and len(call.args) > position:
        return call.args[position]
    return next((k.value for k in call.keywords if k.arg == keyword), None)


def test_every_rejection_in_the_services_names_its_category() -> None:
    """Each ``InvalidInput``, ``RejectedFrame``, ``RejectedTrade`` and dead-letter value built in ``services/``
    names a category: a literal of the vocabulary, or an expression that is one (``exc.category``, a parameter
    typed :data:`~services.core.models.ReasonCategory`: mypy holds its type)."""
    missing, unknown, defaulted = [], [], set()
    sites = 0
    for path in sorted(SERVICES.rglob("*.py")):
        module = path.relative_to(SERVICES).as_posix()
        for name, call in _calls(ast.parse(path.read_text(), str(path))):
            sites += 1
            category = _category(name, call)
            where = f"services/{module}:{call.lineno} {name}"
            if category is None:
                if module in NO_DEAD_LETTERS and name == "InvalidInput":
                    defaulted.add(module)
                else:
                    missing.append(where)
            elif isinstance(category, ast.Constant) and category.value not in REASON_CATEGORIES:
                unknown.append(f"{where}: {category.value!r}")
    assert sites > 90
    assert missing == [], "rejections without a category:\n" + "\n".join(missing)
    assert unknown == [], "categories outside the vocabulary:\n" + "\n".join(unknown)
    assert defaulted <= NO_DEAD_LETTERS


def test_the_modules_left_to_the_default_never_dead_letter() -> None:
    for module in NO_DEAD_LETTERS:
        text = (SERVICES / module).read_text()
        assert "dead_letter" not in text, module


def test_the_vocabulary_is_small_and_documented() -> None:
    assert 5 <= len(REASON_CATEGORIES) <= 10 and len(set(REASON_CATEGORIES)) == len(REASON_CATEGORIES)
    source = (SERVICES / "core" / "models.py").read_text()
    for category in REASON_CATEGORIES:
        assert f"#: * ``{category}``:" in source, f"{category} is not documented next to the vocabulary"


# ---------------------------------------------------------------------------------------------------- trades

T = 1_672_531_200_000  # 2023-01-01 UTC
TRADE = {"a": 7, "p": "100.5", "q": "0.25", "f": 10, "l": 12, "T": T, "m": True}
PAYLOAD = {"e": "aggTrade", "E": T, "s": "BTCUSDT", **TRADE, "M": True}


def batch(*changes: tuple[str, Any], s: str = "BTCUSDT") -> bytes:
    return json.dumps({"type": "trades", "s": s, "trades": [{**TRADE, **dict(changes)}]}).encode()


def envelope(stream: Any = "btcusdt@aggTrade", **changes: Any) -> bytes:
    return json.dumps({"stream": stream, "data": {**PAYLOAD, **changes}}).encode()


def payload(**changes: Any) -> bytes:
    return json.dumps({**PAYLOAD, **changes}).encode()


TRADE_RECORDS = [
    (None, "malformed"),
    (b"{not json", "malformed"),
    (b"[1, 2]", "malformed"),
    (b'{"type": "candle", "s": "BTCUSDT"}', "malformed"),
    (b'{"type": "trades", "s": "BTCUSDT", "trades": [1]}', "malformed"),
    (payload(e="trade"), "malformed"),
    (envelope(stream=5), "malformed"),
    (envelope(stream="btcusdt@trade"), "malformed"),
    (b'{"type": "trades", "s": "BTCUSDT", "trades": []}', "field"),
    (batch(("p", "-1")), "field"),
    (batch(("p", "0.000")), "field"),
    (batch(("q", 1.5)), "field"),
    (batch(("m", "yes")), "field"),
    (batch(("a", -1)), "field"),
    (envelope(p="1e5"), "field"),
    (b'{"type": "gap", "s": "BTCUSDT", "from_a": 9, "to_a": 3}', "field"),
    (batch(("T", T * 1000)), "time"),  # microseconds
    (payload(T=1_000), "time"),
    (batch(("f", 13), ("l", 12)), "inconsistent"),
    (envelope(f=20), "inconsistent"),
    (batch(s="BTC-USDT"), "symbol"),
    (batch(s="ETHUSDT"), "symbol"),  # not the record's key
    (envelope(stream="btc-usdt@aggTrade"), "symbol"),
    (envelope(s="ETHUSDT"), "symbol"),
    (payload(s="BTC USDT"), "symbol"),
]


@pytest.mark.parametrize(("raw", "category"), TRADE_RECORDS)
def test_trades_records_are_rejected_with_their_category(raw: bytes | None, category: str) -> None:
    """The contract's decoder and the aggregator's fast decoder (which defers to it) agree on the category."""
    with pytest.raises(InvalidInput) as contract:
        decode_trades_value(raw, b"BTCUSDT")
    with pytest.raises(InvalidInput) as fast:
        TradesDecoder().decode(raw, b"BTCUSDT")
    assert (contract.value.category, fast.value.category) == (category, category), contract.value.reason
    assert fast.value.reason == contract.value.reason


FRAMES = [
    (b"{oops", "malformed"),
    (b'"text"', "malformed"),
    (b'{"e": "trade", "s": "BTCUSDT"}', "malformed"),
    (b'{"hello": 1}', "malformed"),
    (envelope(stream=5), "malformed"),
    (envelope(stream="btcusdt@depth"), "malformed"),
    (payload(p="-1"), "field"),
    (envelope(q="0"), "field"),
    (envelope(m=1), "field"),
    (payload(T=T * 1000), "time"),
    (envelope(T=T * 1000), "time"),
    (envelope(f=20), "inconsistent"),
    (envelope(stream="btc_usdt@aggTrade"), "symbol"),
    (envelope(s="ETHUSDT"), "symbol"),
    (payload(s=None), "symbol"),
]


@pytest.mark.parametrize(("raw", "category"), FRAMES)
def test_websocket_frames_are_rejected_with_their_category(raw: bytes, category: str) -> None:
    for parse in (parse_frame, parse_frame_general):
        frame = parse(raw)
        assert isinstance(frame, RejectedFrame), frame
        assert frame.category == category, frame.reason


def test_the_frame_classifiers_bug_guard_is_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(obj: Any) -> Any:
        raise TypeError("a bug")

    monkeypatch.setattr("services.ingest.frames._classify", broken)
    frame = parse_frame_general(payload())
    assert isinstance(frame, RejectedFrame) and frame.category == "internal" and "a bug" in frame.reason


# ---------------------------------------------------------------------------------------------------- klines

KLINE = Kline.from_dict(
    {"t": T, "T": T + 59_999, "s": "BTCUSDT", "i": "1m", "f": 1, "L": 5, "o": "10", "c": "11", "h": "12",
     "l": "9", "v": "4", "n": 5, "x": True, "q": "42", "V": "1", "Q": "10", "version": 0, "source": "live"}
)  # fmt: skip


def kline(**changes: Any) -> bytes:
    return json.dumps({**KLINE.to_dict(), **changes}).encode()


KLINE_RECORDS = [
    (None, "malformed"),
    (b"not json", "malformed"),
    (b"[]", "malformed"),
    (json.dumps({k: v for k, v in KLINE.to_dict().items() if k != "s"}).encode(), "symbol"),
    (kline(s="BTC/USDT"), "symbol"),
    (kline(i="7m"), "field"),
    (kline(o="-1"), "field"),
    (kline(n=-1), "field"),
    (kline(x="true"), "field"),
    (kline(source="guess"), "field"),
    (kline(seq=-1), "field"),
    (kline(t=T + 1), "inconsistent"),
    (kline(T=T + 60_000), "inconsistent"),
    (kline(h="8"), "inconsistent"),
    (kline(V="5"), "inconsistent"),
]


@pytest.mark.parametrize(("raw", "category"), KLINE_RECORDS)
def test_kline_records_are_rejected_with_their_category(raw: bytes | None, category: str) -> None:
    with pytest.raises(InvalidInput) as rejected:
        decode_kline_record(raw)
    assert rejected.value.category == category, rejected.value.reason


def test_the_writers_topic_rules_and_column_ranges_have_their_categories() -> None:
    with pytest.raises(InvalidInput) as open_kline:
        finalized_version(Kline.from_dict({**KLINE.to_dict(), "x": False}), None)
    with pytest.raises(InvalidInput) as unordered:
        snapshot_version(KLINE, None)
    huge = Kline.from_dict({**KLINE.to_dict(), "v": "1" + "0" * 21, "q": "1" + "0" * 23})
    with pytest.raises(InvalidInput) as too_large:
        check_fits_table(huge, 0)
    with pytest.raises(InvalidInput) as version:
        check_fits_table(KLINE, 2**64)
    assert [e.value.category for e in (open_kline, unordered, too_large, version)] == [
        "topic",
        "topic",
        "field",
        "field",
    ]


# ---------------------------------------------------------------------------------------------------- book


def trade(a: int, t: int, p: str = "10", symbol: str = "BTCUSDT") -> AggTrade:
    return AggTrade(symbol, a, p, "1", a, a, t, False)


def test_the_books_rejections_have_their_categories_and_keep_them_in_its_state() -> None:
    book = KlineBook("BTCUSDT", ("1m",), repair_horizon_ms=10 * 60_000)
    book.apply([trade(1, T + 20 * 60_000)])
    book.apply([trade(2, T), trade(3, T + 20 * 60_000 + 1, symbol="ETHUSDT"), trade(4, T + 20 * 60_000 + 2, "-1")])
    state = json.loads(json.dumps(book.export_state()))
    expected = [(2, "late"), (3, "symbol"), (4, "field")]
    assert sorted((fields[1], category) for fields, _reason, category in state["rejected"]) == expected
    assert sorted((r.trade.a, r.category) for r in KlineBook.restore(state).drain_rejected()) == expected
    # A state saved before categories (a rejection is [fields, reason]) gets each reason's category back.
    state["rejected"] = [entry[:2] for entry in state["rejected"]]
    assert sorted((r.trade.a, r.category) for r in KlineBook.restore(state).drain_rejected()) == expected
    assert sorted((r.trade.a, r.category) for r in book.drain_rejected()) == expected


# ---------------------------------------------------------------------------------------------- dead letters


def test_a_dead_letter_carries_its_category_next_to_its_reason() -> None:
    value = dead_letter_value("aggregator", "field 'p' (price) = '-1' ...", b"{}", category="field", offset=3)
    letter = json.loads(value)
    assert list(letter) == ["service", "reason", "category", "topic", "partition", "offset", "value"]
    assert (letter["reason"], letter["category"], letter["offset"]) == ("field 'p' (price) = '-1' ...", "field", 3)
