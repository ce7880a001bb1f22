"""Checkpoint records: what a restore reads back, and a clear error for anything it cannot use."""

from __future__ import annotations

import json

import pytest

from services.aggregator.checkpoint import (
    MARKER_KEY,
    CheckpointError,
    decode_partition,
    encode_marker,
    encode_symbol,
)
from services.core.book import KlineBook
from services.core.models import AggTrade, Kline

pytestmark = pytest.mark.unit

T0 = 1_735_689_600_000


def test_the_newest_record_per_key_is_the_checkpoint() -> None:
    book = KlineBook("BTCUSDT", ["1m"])
    book.apply([AggTrade("BTCUSDT", 1, "10", "1", 1, 1, T0, False)])
    pending = Kline.empty("BTCUSDT", "1m", T0, book.current()[0].c)
    latest: dict[bytes | None, bytes | None] = {
        b"BTCUSDT": encode_symbol("BTCUSDT", 42, book.export_state(), [pending]),
        b"ETHUSDT": None,  # a tombstone
        MARKER_KEY: encode_marker(3, 40, 1000, 1),
    }
    checkpoint = decode_partition("ckpt", 3, latest)
    assert (checkpoint.next_offset, checkpoint.seq_limit, checkpoint.records_read) == (40, 1000, 3)
    saved = checkpoint.symbols["BTCUSDT"]
    assert saved.next_offset == 42 and saved.unconfirmed == [pending]
    assert KlineBook.restore(saved.book).current()[0].same_values(book.current()[0])
    assert decode_partition("ckpt", 0, {}).next_offset is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (b"BTCUSDT", b"{", "unreadable"),
        (b"BTCUSDT", json.dumps({"format": 99}).encode(), "not a format-1"),
        (b"ETHUSDT", encode_symbol("BTCUSDT", 1, {}, []), "under another key"),
        (MARKER_KEY, json.dumps({"format": 1, "kind": "marker"}).encode(), "KeyError"),
    ],
)
def test_an_unusable_record_names_topic_partition_and_key(key: bytes, value: bytes, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as info:
        decode_partition("the-ckpt", 5, {key: value})
    assert "the-ckpt[5]" in str(info.value) and repr(key) in str(info.value)
