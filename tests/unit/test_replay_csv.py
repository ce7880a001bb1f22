"""The replay exchange's file feeds read both real data.binance.vision layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.replay.config import FileFeed, ReplayConfig
from services.replay.tape import event_time, load_tape, rest_payload, stream_payload

pytestmark = pytest.mark.unit

TRX = "TRXUSDT-UM-aggTrades-derived-2025-03-04_000004-001644.csv"
BTC = "BTCUSDT-SPOT-aggTrades-2026-01-01_head5000.csv"


def test_trx_futures_file_with_header_and_milliseconds(data_dir: Path) -> None:
    tape = load_tape(ReplayConfig(feed=(FileFeed(path=data_dir / TRX, symbol="TRXUSDT"),), venue="usdm"))
    trx = tape.symbols["TRXUSDT"]
    assert len(trx.trades) == 9_999 == len(tape)
    first, last = trx.trades[0], trx.trades[-1]
    assert (first.a, first.p, first.q, first.f, first.T, first.m) == (
        1_000_000_000, "0.23103", "243.0", 548_321_769, 1_741_046_404_349, False,
    )  # fmt: skip
    assert last.a == 1_000_009_998 and last.T == 1_741_047_404_086
    assert [t.a for t in trx.trades] == list(range(1_000_000_000, 1_000_009_999))
    assert tape.start_ms == first.T and tape.end_ms == last.T
    # futures frames carry no "M"
    assert stream_payload(first, "usdm").endswith('"m":false}')
    assert rest_payload(first, "usdm") == (
        '{"a":1000000000,"p":"0.23103","q":"243.0","f":548321769,"l":548321769,"T":1741046404349,"m":false}'
    )


def test_btc_spot_file_without_header_and_microseconds(data_dir: Path) -> None:
    tape = load_tape(ReplayConfig(feed=(FileFeed(path=data_dir / BTC, symbol="BTCUSDT"),)))
    btc = tape.symbols["BTCUSDT"]
    assert len(btc.trades) == 5_000
    first = btc.trades[0]
    assert (first.a, first.p, first.q, first.T, first.m) == (
        3_800_397_495, "87648.21000000", "0.08185000", 1_767_225_600_039, True,
    )  # fmt: skip
    times = [t.T for t in btc.trades]
    assert times == sorted(times) and times[-1] < 1_767_226_400_000  # ms, within 00:00-00:13
    assert all(b.a == a.a + 1 and b.f == a.l + 1 for a, b in zip(btc.trades, btc.trades[1:], strict=False))
    assert event_time(first) == 1_767_225_600_056  # E = T + 1..23 ms, fixed per id
    assert stream_payload(first, "spot") == (
        '{"e":"aggTrade","E":1767225600056,"s":"BTCUSDT","a":3800397495,"p":"87648.21000000","q":"0.08185000",'
        '"f":5723703861,"l":5723703861,"T":1767225600039,"m":true,"M":true}'
    )


def test_two_files_merge_into_one_timeline(data_dir: Path) -> None:
    config = ReplayConfig(
        feed=(FileFeed(path=data_dir / TRX, symbol="TRXUSDT"), FileFeed(path=data_dir / BTC, symbol="BTCUSDT"))
    )
    tape = load_tape(config)
    assert len(tape) == 14_999
    assert list(tape.timeline_times) == sorted(tape.timeline_times)
    assert tape.start_ms == 1_741_046_404_349


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        load_tape(ReplayConfig(feed=(FileFeed(path=tmp_path / "nope.csv", symbol="BTCUSDT"),)))


def test_config_rejects_the_same_symbol_twice(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="own symbol"):
        ReplayConfig(feed=(FileFeed(path=data_dir / TRX, symbol="X1"), FileFeed(path=data_dir / BTC, symbol="X1")))
