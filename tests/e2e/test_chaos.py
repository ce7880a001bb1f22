"""The fault matrix: every service killed, every dependency down, through the whole pipeline, nothing lost.

Each scenario plays a seeded tape through the whole pipeline (``klines run``'s :class:`LocalPipeline`: replay
exchange → ingest → Kafka → aggregator → writers → embedded ClickHouse, gateway beside), injects its faults
itself at points of the run (:class:`harness.FaultPipeline`: after so many trades sent, SIGTERM or SIGKILL of
a process the run started, the replay exchange's fault API, a broker of its own killed), lets the run drain and
stop as ``klines run`` does, and then requires of the result what spec §5 promises:

* ``klines_finalized FINAL`` equals what ``klines replay`` computes from the same tape, field by field;
* zero ``DATA_LOSS``, nothing dropped, a complete drain, and exactly the dead letters the test injected;
* snapshots: per key, versions only increase, and the latest snapshot of a closed kline agrees with its row.

Marker ``chaos`` (``make test-long``, run by CI after ``make test``); each scenario takes one to two minutes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import (
    FaultPipeline,
    Step,
    Tape,
    assert_no_loss,
    check_equal,
    check_snapshots,
    generated_tape,
    isolated_env,
    run_faulted,
)

pytestmark = pytest.mark.chaos

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
INTERVALS = "1m,3m,5m,15m,1h,1d,1M"


@pytest.fixture
def state(kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The run's own state, topics and ports, in this process's environment (the pipeline runs in it)."""
    state = tmp_path / "state"
    for key, value in isolated_env(kafka_bootstrap, state).items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    yield state


def tape_of(tmp: Path, minutes: float = 12) -> Tape:
    """About 3,000 trades a market minute over three symbols, across a day and a month boundary."""
    return generated_tape(tmp / "tape", "market", SYMBOLS, "2026-01-31T23:54:00Z", minutes / 1440, INTERVALS)


def verify(tape: Tape, state: Path, tmp: Path, out: str, code: int, *, dead_letters: int = 0) -> None:
    assert code == 0, out
    assert_no_loss(out, state, dead_letters=dead_letters)
    rows = check_equal(out, state, tape, tmp)
    assert check_snapshots(f"chdb://{state / 'chdb'}", rows) > 0


def restart(name: str, *, hard: bool, down_s: float = 0.0) -> Callable[[FaultPipeline], None]:
    def action(p: FaultPipeline) -> None:
        p.restart(name, hard=hard, down_s=down_s)

    return action


# ------------------------------------------------------------------------------------------------ services


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
def test_ingest_stopped_mid_tape_and_started_again(state: Path, tmp_path: Path, hard: bool) -> None:
    # Down for 5 s while the exchange publishes: its restart reads where it stopped from the topic's tail and
    # backfills the rest over REST before the live stream.
    tape = tape_of(tmp_path)
    steps = [Step(8_000, f"{'kill' if hard else 'stop'} ingest, 5 s down", restart("ingest", hard=hard, down_s=5))]
    _, out, code = run_faulted(tape, tmp_path, steps, speed=12)
    verify(tape, state, tmp_path, out, code)


def kill_writers_mid_batch(p: FaultPipeline) -> None:
    """SIGKILL the writers while they hold a batch not yet stored (at most 5 s of waiting for one)."""
    deadline = time.monotonic() + 5
    while p.metrics_of("writers").get("buffered", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    p.restart("writers", hard=True)


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
def test_writers_stopped_mid_batch_and_started_again(state: Path, tmp_path: Path, hard: bool) -> None:
    tape = tape_of(tmp_path)
    action = kill_writers_mid_batch if hard else restart("writers", hard=False, down_s=5)
    steps = [Step(10_000, f"{'kill' if hard else 'stop'} the writers", action)]
    _, out, code = run_faulted(tape, tmp_path, steps, speed=12)
    verify(tape, state, tmp_path, out, code)


def test_writers_killed_three_times(state: Path, tmp_path: Path) -> None:
    tape = tape_of(tmp_path)
    steps = [Step(n, f"kill the writers mid-batch ({i + 1} of 3)", kill_writers_mid_batch) for i, n in
             enumerate((6_000, 16_000, 26_000))]  # fmt: skip
    _, out, code = run_faulted(tape, tmp_path, steps, speed=12)
    verify(tape, state, tmp_path, out, code)


def test_gateway_killed_does_not_touch_storage(state: Path, tmp_path: Path) -> None:
    tape = tape_of(tmp_path)
    steps = [Step(8_000, "kill the gateway, 3 s down", restart("gateway", hard=True, down_s=3))]
    _, out, code = run_faulted(tape, tmp_path, steps, speed=12)
    verify(tape, state, tmp_path, out, code)


# ------------------------------------------------------------------------------------------------ ClickHouse down


def engine_pids(p: FaultPipeline) -> list[int]:
    """The writers' embedded ClickHouse processes (``python -m services.shared.embedded``, their children)."""
    parent = p.process("writers").pid
    pids = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        try:
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:
            continue
    found = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"services.shared.embedded" in argv:
            found.append(pid)
    return found


def clickhouse_down(seconds: float) -> Callable[[FaultPipeline], None]:
    """Kill the writers' embedded engine, and every engine they start again, for ``seconds``: ClickHouse is
    unreachable that long (each insert fails), then comes back with the same directory."""

    def action(p: FaultPipeline) -> None:
        deadline = time.monotonic() + seconds
        killed = 0
        while True:
            for pid in engine_pids(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        assert killed, "no embedded ClickHouse process of the writers was found"
        p.say(f"test: killed {killed} embedded ClickHouse process(es) of the writers over {seconds:g} s")

    return action


@pytest.mark.parametrize("seconds", [0.0, 12.0], ids=["killed-once", "down-12s"])
def test_clickhouse_engine_killed_under_the_writers(state: Path, tmp_path: Path, seconds: float) -> None:
    tape = tape_of(tmp_path)
    steps = [Step(10_000, f"ClickHouse down ({seconds:g} s)", clickhouse_down(seconds))]
    _, out, code = run_faulted(tape, tmp_path, steps, speed=12)
    verify(tape, state, tmp_path, out, code)
