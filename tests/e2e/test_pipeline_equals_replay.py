"""Pipeline equals replay: the whole pipeline stores exactly what ``klines replay`` computes from the same tape.

The system's main invariant (spec §5). Each case writes a seeded tape (``klines tape``'s generators, or a real
recording), plays it through the whole pipeline as a user does (``klines run --file ... --until-exhausted``:
replay exchange → ingest → Kafka → aggregator → writers → embedded ClickHouse), folds the same files with
``klines replay`` into another ClickHouse directory, and compares ``klines_finalized FINAL`` of the two, every
field of every kline of every interval (empty klines, 1w and 1M included). The run itself must report zero
``DATA_LOSS``, zero dead letters and nothing dropped, and exit 0.

Cheap cases are ``e2e`` (in ``make test``); the long ones are ``long`` (``make test-long``, also run by CI).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import (
    Step,
    Tape,
    assert_no_loss,
    check_equal,
    check_snapshots,
    generated_tape,
    kinds,
    play,
    run_faulted,
)

from services.core.reference import read_aggtrades_csv, read_klines_csv

ALL_BUT_1S = "1m,3m,5m,15m,30m,1h,2h,4h,6h,8h,12h,1d,3d,1w,1M"
TRX_TRADES = "TRXUSDT-UM-aggTrades-derived-2025-03-04_000004-001644.csv"
TRX_KLINES = "TRXUSDT-UM-1m-2025-03-04_0000-0016.csv"


# ------------------------------------------------------------------------------------------------ cheap (e2e)


@pytest.mark.e2e
def test_a_dense_tape_with_1s_at_full_speed(kafka_bootstrap: str, tmp_path: Path) -> None:
    tape = generated_tape(
        tmp_path / "tape", "market", ["BTCUSDT", "ETHUSDT", "XRPUSDT"], "2026-01-31T23:55:00Z", 10 / 1440,
        "1s,1m,3m,5m,1h,1d,1w,1M",
    )  # fmt: skip
    state = tmp_path / "state"
    out = play(kafka_bootstrap, state, tape)
    rows = check_equal(out, state, tape, tmp_path)
    one_s = [key for key in rows if key[1] == "1s"]
    assert len(one_s) >= 3 * 590  # ten minutes of 1s klines per symbol, empty ones included
    assert kinds(rows).get("empty", 0) > 0 and kinds(rows).get("live", 0) > 0


@pytest.mark.e2e
def test_the_real_trx_recording_at_full_speed_and_binances_own_klines(
    kafka_bootstrap: str, tmp_path: Path, data_dir: Path
) -> None:
    tape = Tape((f"{data_dir / TRX_TRADES}:TRXUSDT",), "1m,3m,5m,15m", venue="usdm")
    state = tmp_path / "state"
    out = play(kafka_bootstrap, state, tape)
    rows = check_equal(out, state, tape, tmp_path)
    binance = read_klines_csv(data_dir / TRX_KLINES, "TRXUSDT", "1m")[:16]  # 00:16 is still open at the end
    assert len(binance) == 16
    for kline in binance:
        row = rows[("TRXUSDT", "1m", kline.t)]
        assert (row[3], row[6], row[7], row[8], row[9], row[10], row[11], row[12], row[13], row[14]) == (
            kline.T, kline.o, kline.h, kline.l, kline.c, kline.v, kline.q, kline.n, kline.V, kline.Q,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------ long


@pytest.mark.long
def test_a_sparse_multi_week_tape_with_quiet_hours_and_boundary_bursts(kafka_bootstrap: str, tmp_path: Path) -> None:
    # Five weeks from Sunday 2024-12-29: a week start, a month and year start, quiet stretches up to 36 h.
    tape = generated_tape(tmp_path / "tape", "sparse", ["BTCUSDT", "ETHUSDT"], "2024-12-29T00:00:00Z", 35, ALL_BUT_1S)
    state = tmp_path / "state"
    out = play(kafka_bootstrap, state, tape, timeout=1200)
    rows = check_equal(out, state, tape, tmp_path)
    assert {key[1] for key in rows} == set(ALL_BUT_1S.split(","))
    assert sum(1 for key in rows if key[1] == "1M") >= 2 * 1 and sum(1 for key in rows if key[1] == "1w") >= 2 * 4
    assert kinds(rows)["empty"] > 100_000  # the quiet stretches closed as empty klines, none lost


@pytest.mark.long
def test_a_dense_tape_at_real_time_speed(kafka_bootstrap: str, tmp_path: Path) -> None:
    tape = generated_tape(
        tmp_path / "tape", "market", ["BTCUSDT", "ETHUSDT"], "2026-03-31T23:58:30Z", 2 / 1440, "1s,1m,5m,1d,1M"
    )
    state = tmp_path / "state"
    out = play(kafka_bootstrap, state, tape, speed="1")
    rows = check_equal(out, state, tape, tmp_path)
    for spec in tape.files:  # every second from each symbol's first trade to its last closed: none missing
        path, symbol = spec.rsplit(":", 1)
        times = [trade.T for trade in read_aggtrades_csv(path, symbol)]
        seconds = {key[2] for key in rows if key[0] == symbol and key[1] == "1s"}
        assert seconds == set(range(times[0] // 1000 * 1000, times[-1] // 1000 * 1000, 1000))


@pytest.mark.long
@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
def test_an_aggregator_stopped_mid_tape_and_started_again(state: Path, tmp_path: Path, hard: bool) -> None:
    # 20 market minutes played in a minute; the aggregator is down 8 s while the exchange goes on publishing.
    tape = generated_tape(
        tmp_path / "tape", "market", ["BTCUSDT", "ETHUSDT", "SOLUSDT"], "2026-01-31T23:50:00Z", 20 / 1440,
        "1m,3m,5m,15m,1h,1d,1M",
    )  # fmt: skip
    label = f"{'kill' if hard else 'stop'} the aggregator, 8 s down"
    steps = [Step(8_000, label, lambda p: p.restart("aggregator", hard=hard, down_s=8.0))]
    _, out, code = run_faulted(tape, tmp_path, steps, speed=20.0)
    assert code == 0, out
    assert_no_loss(out, state)
    rows = check_equal(out, state, tape, tmp_path)
    assert check_snapshots(f"chdb://{state / 'chdb'}", rows) > 0
