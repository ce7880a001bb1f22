"""Tapes: the sparse generator's promises, and CSV files that read back exactly."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.cli import main
from services.core.reference import read_aggtrades_csv, write_aggtrades_csv
from services.replay.config import parse_utc_ms
from services.replay.generator import generate_sparse_trades

pytestmark = pytest.mark.unit

START = parse_utc_ms("2024-12-29T00:00:00Z")  # a Sunday: the tape crosses week and month starts
WEEKS5 = START + 35 * 86_400_000


def test_sparse_tapes_are_deterministic_contiguous_and_sparse_with_boundary_ties() -> None:
    trades = generate_sparse_trades("BTCUSDT", seed=7, start_ms=START, end_ms=WEEKS5)
    assert trades == generate_sparse_trades("BTCUSDT", seed=7, start_ms=START, end_ms=WEEKS5)
    assert trades != generate_sparse_trades("BTCUSDT", seed=8, start_ms=START, end_ms=WEEKS5)
    assert [t.a for t in trades] == list(range(trades[0].a, trades[0].a + len(trades)))
    assert all(b.f == a.l + 1 for a, b in itertools.pairwise(trades))
    assert all(START <= t.T < WEEKS5 for t in trades)
    assert [t.T for t in trades] == sorted(t.T for t in trades)
    gaps = [b.T - a.T for a, b in itertools.pairwise(trades)]
    assert sum(g > 3_600_000 for g in gaps) >= 20 and max(gaps) > 6 * 3_600_000
    times = {t.T for t in trades}
    for boundary in (parse_utc_ms("2024-12-30T00:00:00Z"), parse_utc_ms("2025-01-01T00:00:00Z")):
        assert datetime.fromtimestamp(boundary / 1000, tz=UTC).hour == 0
        at = [t for t in trades if t.T in (boundary - 1, boundary)]
        assert {t.T for t in at} == {boundary - 1, boundary}  # both sides of a week start / month start
        assert len(at) >= 4  # millisecond ties on each side
    assert boundary in times


def test_a_written_tape_reads_back_exactly(tmp_path: Path) -> None:
    trades = generate_sparse_trades("ETHUSDT", seed=3, start_ms=START, end_ms=START + 3 * 86_400_000)
    path = tmp_path / "ETHUSDT.csv"
    assert write_aggtrades_csv(path, trades) == len(trades)
    assert read_aggtrades_csv(path, "ETHUSDT") == trades


def test_klines_tape_writes_one_file_per_symbol_and_prints_the_file_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["tape", str(tmp_path), "--symbols", "btcusdt,XRPUSDT", "--kind", "market", "--duration", "10m"])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert printed == [
        "--file",
        f"{tmp_path / 'BTCUSDT.csv'}:BTCUSDT",
        "--file",
        f"{tmp_path / 'XRPUSDT.csv'}:XRPUSDT",
    ]
    assert read_aggtrades_csv(tmp_path / "XRPUSDT.csv", "XRPUSDT")
