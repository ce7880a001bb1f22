"""The pipeline-equals-replay harness: play a tape through the whole pipeline, fold it with ``klines replay``,
compare ``klines_finalized FINAL`` of the two field by field, and check the run lost nothing.

Used by ``test_pipeline_equals_replay.py`` and the fault tests; see that module for what each case proves.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.replay.config import parse_utc_ms
from services.runner import LocalPipeline
from services.shared import clickhouse
from services.shared.settings import ClickHouseSettings
from services.tapes import write_tape

REPO = Path(__file__).resolve().parents[2]
COLUMNS = (
    "symbol", "interval", "open_time", "close_time", "first_trade_id", "last_trade_id", "open", "high", "low",
    "close", "volume", "quote_volume", "trade_count", "taker_buy_volume", "taker_buy_quote_volume", "version",
    "source",
)  # fmt: skip

Row = tuple[Any, ...]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_env(kafka_bootstrap: str, state: Path) -> dict[str, str]:
    """A run with its own state, ClickHouse directory, topics, consumer groups and free ports."""
    name = f"eq-{uuid.uuid4().hex[:8]}"
    return dict(
        os.environ,
        KAFKA_BOOTSTRAP=kafka_bootstrap,
        CLICKHOUSE_DSN=f"chdb://{state / 'chdb'}",
        KLINES_SERVICE__STATE_DIR=str(state),
        KLINES_KAFKA__TOPICS__TRADES=f"{name}.trades",
        KLINES_KAFKA__TOPICS__FINALIZED=f"{name}.klines.finalized",
        KLINES_KAFKA__TOPICS__SNAPSHOTS=f"{name}.klines.snapshots",
        KLINES_KAFKA__TOPICS__DEAD_LETTER=f"{name}.dead-letter",
        KLINES_KAFKA__CLIENT_ID=name,
        KLINES_AGGREGATOR__HTTP_PORT=str(free_port()),
        KLINES_SERVICE__INGEST_HTTP_PORT=str(free_port()),
        KLINES_SERVICE__WRITERS_HTTP_PORT=str(free_port()),
        KLINES_GATEWAY__HTTP_PORT=str(free_port()),
    )


@dataclass(frozen=True)
class Tape:
    """Files to play (``PATH:SYMBOL``), the intervals to compute, and the venue."""

    files: tuple[str, ...]
    intervals: str
    venue: str = "spot"

    def file_args(self) -> list[str]:
        return [arg for spec in self.files for arg in ("--file", spec)]


def generated_tape(out: Path, kind: str, symbols: list[str], start: str, days: float, intervals: str) -> Tape:
    start_ms = parse_utc_ms(start)
    paths = write_tape(out, symbols, kind=kind, seed=7, start_ms=start_ms, end_ms=start_ms + int(days * 86_400_000))
    return Tape(tuple(f"{path}:{symbol}" for symbol, path in paths.items()), intervals)


def run_argv(tape: Tape, *, speed: str) -> list[str]:
    return [
        sys.executable, "-m", "services.cli", "run", "--offline", *tape.file_args(), "--venue", tape.venue,
        "--intervals", tape.intervals, "--speed", speed, "--until-exhausted", "--no-fresh",
        "--replay-port", str(free_port()), "--drain-stall", "90",
    ]  # fmt: skip


def play(kafka_bootstrap: str, state: Path, tape: Tape, *, speed: str = "0", timeout: float = 900) -> str:
    """``klines run`` on the tape until exhausted and drained; its output. Fails unless it reports no loss."""
    env = isolated_env(kafka_bootstrap, state)
    done = subprocess.run(
        run_argv(tape, speed=speed), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    out = done.stdout
    assert done.returncode == 0, f"klines run exited {done.returncode}\nstdout:\n{out}\nstderr:\n{done.stderr}"
    assert_no_loss(out, state)
    return out


def assert_no_loss(out: str, state: Path) -> None:
    """The run's summary and every service log: zero DATA_LOSS, zero dead letters, nothing dropped."""
    for line in ("DATA_LOSS: 0", "dead letters: 0", "drain: complete", "result: OK, nothing lost"):
        assert re.search(rf"^\s*{re.escape(line)}", out, re.M), f"{line!r} missing from:\n{out}"
    logs = sorted((state / "logs").glob("*.log"))
    assert logs, f"no service logs in {state / 'logs'}"
    for log in logs:
        text = log.read_text(errors="replace")
        assert '"log_type": "DATA_LOSS"' not in text, f"DATA_LOSS in {log.name}"
        assert "DEAD_LETTER_DROPPED" not in text, f"a dead letter was dropped in {log.name}"
        assert "checkpoint not written" not in text, f"a checkpoint could not be written ({log.name})"


def replay(tape: Tape, dsn: str, *, close_last: bool = False) -> None:
    """``klines replay`` of the same files into ``dsn``."""
    env = dict(os.environ, CLICKHOUSE_DSN=dsn)
    argv = [sys.executable, "-m", "services.cli", "replay", *tape.files, "--intervals", tape.intervals]
    argv += ["--close-last"] if close_last else []
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"klines replay exited {done.returncode}:\n{done.stdout}\n{done.stderr}"


def finalized(dsn: str) -> dict[tuple[str, str, int], Row]:
    """Every row of ``klines_finalized FINAL`` in ``dsn``, keyed by (symbol, interval, open_time)."""
    settings = ClickHouseSettings(dsn=dsn)
    client = clickhouse.connect(settings)
    try:
        rows = clickhouse.query_rows(
            client, f"SELECT {', '.join(COLUMNS)} FROM {settings.database}.{settings.finalized_table} FINAL"
        )
    finally:
        clickhouse.close(settings)
    return {(row[0], row[1], row[2]): row for row in rows}


def assert_same_klines(pipeline: dict[tuple[str, str, int], Row], expected: dict[tuple[str, str, int], Row]) -> None:
    """Field by field; on failure, the counts and the first differences, readable."""
    missing = sorted(expected.keys() - pipeline.keys())
    extra = sorted(pipeline.keys() - expected.keys())
    differing = sorted(key for key in expected.keys() & pipeline.keys() if expected[key] != pipeline[key])
    if missing or extra or differing:
        lines = [f"{len(missing)} missing, {len(extra)} extra, {len(differing)} differing of {len(expected)}"]
        lines += [f"missing {key}" for key in missing[:5]] + [f"extra {key}" for key in extra[:5]]
        for key in differing[:5]:
            fields = [
                f"{name}: pipeline {a!r} replay {b!r}"
                for name, a, b in zip(COLUMNS, pipeline[key], expected[key], strict=True)
                if a != b
            ]
            lines.append(f"{key}: " + "; ".join(fields))
        raise AssertionError("\n".join(lines))


def check_equal(out: str, state: Path, tape: Tape, tmp: Path) -> dict[tuple[str, str, int], Row]:
    """The pipeline's stored klines equal ``klines replay``'s of the same tape; the pipeline's rows."""
    got = finalized(f"chdb://{state / 'chdb'}")
    replay(tape, f"chdb://{tmp / 'replay-chdb'}")
    expected = finalized(f"chdb://{tmp / 'replay-chdb'}")
    assert expected, "klines replay stored nothing: the tape is empty"
    assert_same_klines(got, expected)
    assert f"stored {len(got)} (ClickHouse, FINAL)" in out, out
    return got


def kinds(rows: dict[tuple[str, str, int], Row]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows.values():
        counts[row[-1]] = counts.get(row[-1], 0) + 1
    return counts


class StopStartPipeline(LocalPipeline):
    """``klines run``'s pipeline whose aggregator is stopped mid-tape (SIGTERM or SIGKILL), kept down while the
    exchange goes on publishing, then started again before the run continues."""

    def __init__(self, *args: Any, kill: bool, after_trades: int, down_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kill, self.after_trades, self.down_s = kill, after_trades, down_s
        self.interrupted = False

    def watch(self, stop_requested: Any) -> str:
        deadline = time.monotonic() + 120
        while self._metric("aggregator", "trades_applied") < self.after_trades:
            assert time.monotonic() < deadline, "the aggregator applied too few trades to stop it mid-tape"
            time.sleep(0.1)
        aggregator = self._service("aggregator")
        assert aggregator is not None and aggregator.proc is not None
        self.say(f"test: {'killing' if self.kill else 'stopping'} the aggregator mid-tape")
        if self.kill:
            aggregator.proc.kill()
            aggregator.proc.wait()
        else:
            assert aggregator.stop(30) == 0
        sent_before = self._sent(self._replay_status())
        time.sleep(self.down_s)
        assert self._sent(self._replay_status()) != sent_before, "the exchange published nothing meanwhile"
        aggregator.start(self.env)
        self._wait_ready(aggregator, timeout=90)
        self.interrupted = True
        return super().watch(stop_requested)
