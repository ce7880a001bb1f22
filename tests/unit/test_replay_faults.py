"""Per-frame faults of the replay exchange (skip, duplicate, reorder) and malformed payloads."""

from __future__ import annotations

import json

import pytest

from services.core.models import InvalidInput, parse_agg_trade
from services.replay.batch import Batch
from services.replay.faults import MALFORMED_KINDS, FaultState, malformed_payload
from services.replay.streams import encode_text_frames

pytestmark = pytest.mark.unit

PAYLOAD = (
    '{"e":"aggTrade","E":1767225600049,"s":"BTCUSDT","a":12,"p":"87648.21000000","q":"0.08185000",'
    '"f":5,"l":5,"T":1767225600039,"m":true,"M":true}'
)


def frames(symbol: int, ids: range) -> list[tuple[int, int, str]]:
    return [(symbol, a, f"{symbol}:{a}") for a in ids]


def sent(batch: Batch) -> list[tuple[int, str]]:
    assert len(batch.symbols) == len(batch.payloads) == len(batch)
    return list(zip(batch.symbols, batch.payloads, strict=True))


def test_no_fault_passes_everything_through() -> None:
    state = FaultState()
    assert not state.active
    assert sent(state.apply(frames(0, range(3)))) == [(0, "0:0"), (0, "0:1"), (0, "0:2")]


def test_skip_drops_exactly_the_range_of_that_symbol() -> None:
    state = FaultState(skips={0: [(2, 3)]})
    out = sent(state.apply(frames(0, range(6)) + frames(1, range(6))))
    assert [p for s, p in out if s == 0] == ["0:0", "0:1", "0:4", "0:5"]
    assert len([p for s, p in out if s == 1]) == 6


def test_duplicate_sends_the_next_frames_twice() -> None:
    state = FaultState(duplicates={None: 2})
    out = [p for _, p in sent(state.apply(frames(0, range(4))))]
    assert out == ["0:0", "0:0", "0:1", "0:1", "0:2", "0:3"]
    assert not state.active


def test_reorder_swaps_neighbours_of_one_symbol_even_across_batches() -> None:
    state = FaultState(reorders={1: 2})
    first = [p for _, p in sent(state.apply(frames(0, range(2)) + frames(1, range(3))))]
    assert first == ["0:0", "0:1", "1:1", "1:0"]  # 1:2 is held for the next pair
    second = [p for _, p in sent(state.apply(frames(1, range(3, 5))))]
    assert second == ["1:3", "1:2", "1:4"]
    assert not state.active


def test_held_frame_is_released_at_the_end() -> None:
    state = FaultState(reorders={None: 1})
    assert sent(state.apply(frames(0, range(1)))) == []
    assert sent(state.release_held()) == [(0, "0:0")]


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_every_malformed_kind_is_rejected_by_the_core_parser(kind: str) -> None:
    text = malformed_payload(kind, PAYLOAD)
    with pytest.raises((InvalidInput, ValueError)):
        parse_agg_trade(json.loads(text))


def test_unknown_malformed_kind() -> None:
    with pytest.raises(ValueError, match="unknown malformed kind"):
        malformed_payload("nonsense", PAYLOAD)


def test_frame_encoding_lengths() -> None:
    small, medium, large = "x" * 10, "y" * 300, "z" * 70_000
    data = encode_text_frames([small, medium, large])
    assert data[:2] == bytes((0x81, 10)) and data[2:12] == small.encode()
    assert data[12:16] == bytes((0x81, 126)) + (300).to_bytes(2, "big")
    offset = 16 + 300
    assert data[offset : offset + 10] == bytes((0x81, 127)) + (70_000).to_bytes(8, "big")
    assert len(data) == offset + 10 + 70_000
