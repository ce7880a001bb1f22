"""The fault matrix: every service killed, every dependency down, through the whole pipeline, nothing lost.

Each scenario plays a seeded tape through the whole pipeline (``klines run``'s :class:`LocalPipeline`: replay
exchange → ingest → Kafka → aggregator → writers → embedded ClickHouse, gateway beside), injects its faults
itself at points of the run (:class:`harness.FaultPipeline`: after so many trades sent, SIGTERM or SIGKILL of
a process the run started, a second aggregator or group member joining and leaving, the replay exchange's fault
API, steps of the aggregator's system clock, a broker of its own killed), lets the run drain and stop as
``klines run`` does, and then requires of the result what spec §5 promises:

* ``klines_finalized FINAL`` equals what ``klines replay`` computes from the same tape, field by field;
* zero ``DATA_LOSS``, nothing dropped, a complete drain, and exactly the dead letters the test injected;
* snapshots: per key, versions only increase, and the latest snapshot of a closed kline agrees with its row.

Marker ``chaos`` (``make test-long``, run by CI after ``make test``); each scenario takes one to two minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from harness import (
    COLUMNS,
    REPO,
    FaultPipeline,
    Step,
    Tape,
    assert_no_loss,
    check_corrected,
    check_equal,
    check_snapshots,
    free_port,
    generated_tape,
    isolated_env,
    member_lines,
    run_faulted,
    trades_in,
)

from services.shared.kafka import end_offsets, make_consumer, make_producer
from services.shared.settings import KafkaSettings

pytestmark = pytest.mark.chaos

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
INTERVALS = "1m,3m,5m,15m,1h,1d,1M"
#: Market time per real time: a twelve-minute tape plays in 36 s.
SPEED = 20.0


def tape_of(tmp: Path, minutes: float = 12) -> Tape:
    """About 3,000 trades a market minute over three symbols, across a day and a month boundary."""
    return generated_tape(tmp / "tape", "market", SYMBOLS, "2026-01-31T23:54:00Z", minutes / 1440, INTERVALS)


def verify(tape: Tape, state: Path, tmp: Path, out: str, code: int, *, dead_letters: int = 0) -> None:
    assert code == 0, out
    assert_no_loss(out, state, dead_letters=dead_letters)
    rows = check_equal(out, state, tape, tmp)
    assert check_snapshots(f"chdb://{state / 'chdb'}", rows) > 0


def assert_verified_against_the_exchange(out: str) -> None:
    """The run's ``--verify``: every stored kline equals the exchange's own REST kline (``klines verify``)."""
    assert re.search(r"^\s*verify: OK: \d+ klines checked .*, 0 mismatches, 0 gaps, 0 extras$", out, re.M), out


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
    _, out, code = run_faulted(tape, tmp_path, steps, speed=SPEED)
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
    _, out, code = run_faulted(tape, tmp_path, steps, speed=SPEED)
    verify(tape, state, tmp_path, out, code)


def test_writers_killed_three_times(state: Path, tmp_path: Path) -> None:
    tape = tape_of(tmp_path)
    steps = [Step(n, f"kill the writers mid-batch ({i + 1} of 3)", kill_writers_mid_batch) for i, n in
             enumerate((6_000, 16_000, 26_000))]  # fmt: skip
    _, out, code = run_faulted(tape, tmp_path, steps, speed=SPEED)
    verify(tape, state, tmp_path, out, code)


def test_gateway_killed_does_not_touch_storage(state: Path, tmp_path: Path) -> None:
    tape = tape_of(tmp_path)
    steps = [Step(8_000, "kill the gateway, 3 s down", restart("gateway", hard=True, down_s=3))]
    _, out, code = run_faulted(tape, tmp_path, steps, speed=SPEED)
    verify(tape, state, tmp_path, out, code)


def connections_rotated_at_their_lifetime(p: FaultPipeline) -> None:
    """The exchange closes every connection once it is 3 s old (1001, as Binance does at 24 h), for 10 s: ingest
    reconnects each time and fetches what it missed meanwhile over REST."""
    before = p.metrics_of("ingest").get("reconnects", 0)
    p.exchange_fault("connection_lifetime", {"seconds": 3.0})
    time.sleep(10)
    p.exchange_fault("connection_lifetime", {"seconds": None})
    closed = p.metrics_of("ingest").get("reconnects", 0) - before
    p.say(f"test: ingest reconnected {closed} times")
    assert closed >= 2, "the connections were not rotated"


def banned_during_backfill(p: FaultPipeline) -> None:
    """REST answers 418 for 4 s while every connection is dropped: ingest's catch-up after the reconnect meets the
    ban, sends nothing while it lasts and backfills once it is over (a ban up to ingest's max_ban_wait_s)."""
    before = p.metrics_of("ingest").get("rest_bans", 0)
    p.exchange_fault("ban", {"seconds": 4.0})
    p.exchange_fault("drop_connections")
    time.sleep(6)
    bans = p.metrics_of("ingest").get("rest_bans", 0) - before
    p.say(f"test: ingest was answered 418 {bans} times")
    assert bans > 0, "the backfill never met the ban"


def test_exchange_rotates_connections_and_bans_rest_during_a_backfill(state: Path, tmp_path: Path) -> None:
    tape = tape_of(tmp_path)
    steps = [
        Step(5_000, "connections closed at a 3 s lifetime, for 10 s", connections_rotated_at_their_lifetime),
        Step(24_000, "REST 418 (4 s ban) during a backfill", banned_during_backfill),
    ]
    pipeline, out, code = run_faulted(tape, tmp_path, steps, speed=SPEED, verify=True)
    verify(tape, state, tmp_path, out, code)
    assert pipeline.metrics["ingest"]["rest_bans"] >= 1, pipeline.metrics["ingest"]
    assert_verified_against_the_exchange(out)


# ------------------------------------------------------------------------------------------------ rebalances

#: One symbol per trades partition (six, ``kafka.trades_partitions``; key = symbol, murmur2): whichever
#: partitions a second aggregator is given, it is given trades.
WIDE_SYMBOLS = ["DOTUSDT", "LTCUSDT", "BTCUSDT", "SOLUSDT", "BCHUSDT", "ETHUSDT"]


def wide_tape(tmp: Path) -> Tape:
    """Ten market minutes of six symbols, about 45,000 trades (30 s at 20x), across a day and a month boundary."""
    return generated_tape(tmp / "tape", "market", WIDE_SYMBOLS, "2026-01-31T23:54:00Z", 10 / 1440, INTERVALS)


def until(condition: Callable[[], bool], seconds: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds:g} s: {what()}"
        time.sleep(0.1)


def second_members_join(p: FaultPipeline) -> None:
    """A second aggregator process joins the aggregator's group, and a second member the writers' groups."""
    p.start_second_aggregator()
    p.start_group_member("writers-member", writer_groups(p))


def second_members_share_the_work(p: FaultPipeline) -> None:
    """Done once the two aggregators own disjoint, non-empty sets of trades partitions and the second has
    applied trades of its own, and the writers' second member was given partitions of both writer groups and
    fetched records of each (records the writers had not committed: they must read them again later)."""
    second, member, groups = p.extras["aggregator-2"], p.extras["writers-member"], writer_groups(p)

    def shared() -> bool:
        first, other = p.metrics_of("aggregator"), second.get("/metrics.json") or {}
        mine, theirs = set(first.get("partitions") or []), set(other.get("partitions") or [])
        return bool(mine and theirs and not mine & theirs and other.get("ready") and other.get("trades_applied"))

    def joined() -> bool:
        lines = member_lines(member)
        assigned = {line["group"] for line in lines if line.get("assigned")}
        fetched = lines[-1].get("fetched", {}) if lines and "fetched" in lines[-1] else {}
        return assigned == set(groups) and all(fetched.get(group, 0) > 0 for group in groups)

    until(shared, 45, lambda: f"first {p.metrics_of('aggregator')}, second {second.get('/metrics.json')}")
    other = second.get("/metrics.json") or {}
    p.say(f"test: trades partitions {p.metrics_of('aggregator')['partitions']} and {other.get('partitions')}")
    until(joined, 45, lambda: member.tail(5))


def trades_still_flow(p: FaultPipeline) -> None:
    status = p._replay_status() or {}
    assert not status.get("exhausted"), "the tape ended before the second members left: no rebalance under load"


def aggregators_scale_in(hard: bool) -> Callable[[FaultPipeline], None]:
    """The second aggregator leaves: SIGTERM (final checkpoint and commit, leaves the group at once) or SIGKILL
    (the group waits for its session timeout; the first restores its partitions from their last checkpoint)."""

    def action(p: FaultPipeline) -> None:
        trades_still_flow(p)
        figures = p.extras["aggregator-2"].get("/metrics.json") or {}
        assert figures.get("trades_applied", 0) > 0, figures
        assert figures.get("data_loss") == 0 and figures.get("dead_letters") == 0, figures
        p.stop_extra("aggregator-2", hard=hard)
        until(lambda: len(p.metrics_of("aggregator").get("partitions") or []) == 6, 60,
              lambda: f"the first aggregator owns {p.metrics_of('aggregator').get('partitions')}")  # fmt: skip

    return action


def writer_groups(p: FaultPipeline) -> dict[str, str]:
    from services.finalized_writer import finalized_spec
    from services.snapshot_writer import snapshot_spec

    topics = p.settings.kafka.topics
    return {
        finalized_spec(p.settings).group_id: topics.finalized,
        snapshot_spec(p.settings).group_id: topics.snapshots,
    }


def second_writers_process_refused(p: FaultPipeline) -> None:
    """A second writers process on the pipeline's embedded ClickHouse directory stops at its start with exit 2
    and one line naming the server (the directory is locked by the running writers' engine), before it creates
    any Kafka consumer: it never joins a group, and the running writers go on."""
    port = str(free_port())
    env = {**p.env, "KLINES_SERVICE__WRITERS_HTTP_PORT": port}
    done = subprocess.run([sys.executable, "-m", "services.writers"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=90)  # fmt: skip
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "Cannot lock file" in done.stderr and f"cannot reach ClickHouse at {p.settings.clickhouse.dsn}" in (
        done.stderr
    ), done.stderr
    assert p.process("writers").poll() is None


def writers_member_leaves(hard: bool) -> Callable[[FaultPipeline], None]:
    def action(p: FaultPipeline) -> None:
        trades_still_flow(p)
        p.stop_extra("writers-member", hard=hard)

    return action


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
def test_aggregators_and_writers_rebalance_one_two_one_while_trades_flow(
    state: Path, tmp_path: Path, hard: bool
) -> None:
    """Aggregator workers 1 -> 2 -> 1 and writers' group members 1 -> 2 -> 1 mid-tape; the second of each
    leaves by SIGTERM or SIGKILL. The second writers member is a plain group member, not a writers process:
    with the embedded engine only one process can open the ClickHouse directory, so a second writers process
    is refused at its start (checked too); two writers processes storing side by side need a ClickHouse server
    (compose, Kubernetes), which this machine does not run."""
    tape = wide_tape(tmp_path)
    how = "SIGKILL" if hard else "SIGTERM"
    steps = [
        Step(3_000, "a second aggregator and a second writers' group member join", second_members_join),
        Step(12_000, "the second members share the work", second_members_share_the_work),
        Step(27_000, f"the writers' second member leaves ({how})", writers_member_leaves(hard)),
        Step(32_000, f"the second aggregator leaves ({how})", aggregators_scale_in(hard)),
    ]
    if not hard:
        steps.append(Step(40_000, "a second writers process is refused", second_writers_process_refused))
    # 15x: the tape lasts 40 s, so the second members leave while trades still flow.
    pipeline, out, code = run_faulted(tape, tmp_path, steps, speed=15.0)
    verify(tape, state, tmp_path, out, code)
    aggregator = pipeline.metrics["aggregator"]
    # Six partitions restored at its start, and again those the second aggregator had (it checkpointed them).
    assert aggregator["restores"] > 6, aggregator
    for name, writer in pipeline.metrics["writers"]["writers"].items():
        assert writer["revocations"] >= 2 and writer["assignments"] >= 3, (name, writer)


# ------------------------------------------------------------------------------------------------ ClickHouse down


def clickhouse_down(seconds: float) -> Callable[[FaultPipeline], None]:
    """Kill the writers' embedded engine, and every engine they start again, for ``seconds``: ClickHouse is
    unreachable that long (each insert fails), then comes back with the same directory."""

    def action(p: FaultPipeline) -> None:
        deadline = time.monotonic() + seconds
        killed = 0
        while True:
            for pid in p.engine_pids():
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
    _, out, code = run_faulted(tape, tmp_path, steps, speed=SPEED)
    verify(tape, state, tmp_path, out, code)


# ------------------------------------------------------------------------------------------------ the exchange


def exchange(
    action: str, body: dict[str, Any] | None = None, *, then_s: float = 0.0
) -> Callable[[FaultPipeline], None]:
    def step(p: FaultPipeline) -> None:
        p.say(f"test: exchange {action} {body or {}}: {p.exchange_fault(action, body)}")
        time.sleep(then_s)

    return step


def rate_limited_backfill(p: FaultPipeline) -> None:
    """REST limited to 4 weight per 3 s (one aggTrades page), then every connection dropped: after a reconnect
    ingest asks REST for every symbol's missed trades (three symbols: three requests at once), so it must get
    through 429s and their Retry-After; the limit is lifted 8 s later."""
    before = p.metrics_of("ingest").get("rest_rate_limited", 0)
    p.exchange_fault("rate_limit", {"weight_limit": 4, "window_s": 3.0})
    p.exchange_fault("drop_connections")
    time.sleep(8)
    p.exchange_fault("rate_limit", {"weight_limit": None})
    limited = p.metrics_of("ingest").get("rest_rate_limited", 0) - before
    p.say(f"test: ingest was answered 429 {limited} times while it backfilled")
    assert limited > 0, "the backfill never met the rate limit"


def test_exchange_faults_drop_stall_shutdown_and_429_during_backfill(state: Path, tmp_path: Path) -> None:
    tape = tape_of(tmp_path)
    steps = [
        Step(5_000, "WebSocket connections dropped", exchange("drop_connections", then_s=1)),
        Step(11_000, "the exchange stalls 8 s", exchange("stall", {"seconds": 8.0}, then_s=9)),
        Step(17_000, "serverShutdown, closed after 1 s", exchange("server_shutdown", {"close_after_s": 1.0})),
        Step(23_000, "REST 429 during a backfill", rate_limited_backfill),
    ]
    pipeline, out, code = run_faulted(tape, tmp_path, steps, speed=SPEED, verify=True)
    verify(tape, state, tmp_path, out, code)
    ingest = pipeline.metrics["ingest"]
    assert ingest["reconnects"] >= 2 and ingest["server_shutdowns"] >= 1, ingest
    assert_verified_against_the_exchange(out)


# ------------------------------------------------------------------------------------------------ the clock

ADMIN_TOKEN = "chaos-admin-token"


class WallClockPipeline(FaultPipeline):
    """The pipeline with the aggregator on the wall clock (``klines run`` gives a replay the event clock)."""

    def _start_market(self) -> None:
        super()._start_market()
        self.env["KLINES_AGGREGATOR__CLOCK"] = "wall"


def step_clock(delta_ms: int) -> Callable[[FaultPipeline], None]:
    """Step the system time the aggregator's wall clock reads by ``delta_ms`` (``POST /clock?step_ms=``, with
    the admin bearer token); its market time must not follow (nor go back)."""

    def action(p: FaultPipeline) -> None:
        url = f"http://127.0.0.1:{p.settings.aggregator.http_port}/clock?step_ms={delta_ms}"
        refused = urllib.request.Request(url, data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(refused, timeout=5)
        assert caught.value.code == 401, caught.value.code
        request = urllib.request.Request(
            url, data=b"", method="POST", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            answer = json.loads(response.read())
        now_ms = time.time() * 1000
        p.say(f"test: the aggregator's system clock stepped {delta_ms:+d} ms: {answer}")
        assert abs(answer["now_ms"] - now_ms) < 5_000, (answer, now_ms)

    return action


def test_wall_clock_steps_forward_and_back_on_the_aggregator(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The aggregator on the wall clock (live mode) while its system clock steps a day forward, two days back,
    a day forward again and an hour forward: nothing closes early or late, so the stored klines are exactly the
    replay's. The tape is played in real time five minutes ahead of the wall clock, so without the steps the
    clock closes nothing a trade would not close (as ``klines replay``); a clock that followed the first step
    would close every open kline a day early and emit a day of empty klines (the unit tests show the same on the
    engine: ``tests/unit/test_aggregator_clock.py``)."""
    token = tmp_path / "admin-token"
    token.write_text(ADMIN_TOKEN + "\n")
    monkeypatch.setenv("KLINES_SERVICE__ADMIN_TOKEN_FILE", str(token))
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 300))
    tape = generated_tape(tmp_path / "tape", "market", SYMBOLS, start, 40 / 86_400, "1s,1m,5m")
    # The market starts at the wall clock, so how busy its 40 s are depends on the time of day (1,164 to 3,466
    # trades over a day's starts): the steps are placed by share of the tape, never past its end.
    total = trades_in(tape)
    assert total >= 400, f"a tape of {total} trades is too short for four steps"
    day = 86_400_000
    steps = [
        Step(total * 15 // 100, "the aggregator's system clock steps a day forward", step_clock(day)),
        Step(total * 35 // 100, "... two days back", step_clock(-2 * day)),
        Step(total * 55 // 100, "... a day forward (in step again)", step_clock(day)),
        Step(total * 75 // 100, "... an hour forward, to the end", step_clock(3_600_000)),
    ]
    pipeline, out, code = run_faulted(tape, tmp_path, steps, speed=1.0, pipeline_class=WallClockPipeline)
    verify(tape, state, tmp_path, out, code)
    assert pipeline.metrics["aggregator"]["clock_steps"] == 2, pipeline.metrics["aggregator"]


def market_ahead_s(p: FaultPipeline) -> float:
    """How far the exchange's market time (``GET /api/v3/time``) is ahead of this machine's clock, in seconds."""
    with urllib.request.urlopen(f"{p.rest_url}/api/v3/time", timeout=5) as response:
        server_ms = json.loads(response.read())["serverTime"]
    return float(server_ms) / 1000 - time.time()


def outage_on_the_wall_clock(stall_s: float) -> Callable[[FaultPipeline], None]:
    """Bring the market to within a second ahead of the wall clock (pause the feed while it is further ahead),
    then stall every connection ``stall_s``: the aggregator's wall clock closes the stalled trades' klines
    before they arrive, so they come late and correct them."""

    def action(p: FaultPipeline) -> None:
        ahead = market_ahead_s(p)
        if ahead > 1.0:
            p.exchange_fault("pause")
            time.sleep(ahead - 1.0)
            p.exchange_fault("resume")
        p.say(f"test: the market was {ahead:+.1f} s from the wall clock, now {market_ahead_s(p):+.1f} s")
        p.exchange_fault("stall", {"seconds": stall_s})
        time.sleep(stall_s + 1)

    return action


def test_an_outage_on_the_wall_clock_is_corrected_by_higher_versions(state: Path, tmp_path: Path) -> None:
    """The aggregator on the wall clock (live mode) and a market at the wall clock: while the exchange stalls
    8 s, the clock closes the klines of the trades held back (a quiet symbol's kline closes when its time is
    over: live Binance does the same), and when they arrive they correct them. What is stored (``FINAL``) is
    then the replay's klines in every value, the corrected ones as a higher ``version`` with
    ``source="repaired"``, nothing lost, nothing dead-lettered (the trades are minutes within the repair
    horizon)."""
    # The market starts 15 s ahead, about when the pipeline is up; the step pauses it if it is further ahead
    # then. If the start took longer, the market is behind the wall clock and more klines are corrected.
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 15))
    tape = generated_tape(tmp_path / "tape", "market", SYMBOLS, start, 30 / 86_400, "1s,1m,5m")
    total = trades_in(tape)
    assert total >= 200, f"a tape of {total} trades is too short"
    outage = outage_on_the_wall_clock(8.0)
    steps = [Step(total // 5, "the market at the wall clock, then the exchange stalls 8 s", outage)]
    _pipeline, out, code = run_faulted(tape, tmp_path, steps, speed=1.0, pipeline_class=WallClockPipeline)
    assert code == 0, out
    assert_no_loss(out, state)
    rows = check_corrected(state, tape, tmp_path)
    corrected = [key for key, row in rows.items() if row[COLUMNS.index("version")] > 0]
    assert corrected, "nothing was corrected: the stall held back no trade of a kline the clock closed"
    assert check_snapshots(f"chdb://{state / 'chdb'}", rows) > 0


# ------------------------------------------------------------------------------------------------ the broker


@pytest.fixture
def own_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OwnBroker]:
    """A Kafka broker of this test's own (``deploy/kafka/kafka.sh`` on free ports, its own state directory):
    the shared one is never stopped."""
    broker = OwnBroker(tmp_path / "broker")
    broker.run("start")
    try:
        yield broker
    finally:
        broker.run("stop")


class OwnBroker:
    def __init__(self, state: Path) -> None:
        self.port = free_port()
        self.state = state
        self.env = dict(
            os.environ,
            KAFKA_PORT=str(self.port),
            KAFKA_CONTROLLER_PORT=str(free_port()),
            KLINES_STATE_DIR=str(state),
            KAFKA_LIBS_DIR=str(REPO / ".state" / "kafka-libs"),
        )
        self.bootstrap = f"127.0.0.1:{self.port}"

    def run(self, command: str) -> None:
        done = subprocess.run([str(REPO / "deploy" / "kafka" / "kafka.sh"), command], env=self.env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, f"kafka.sh {command}: {done.stderr}"

    def kill(self) -> int:
        """SIGKILL the broker's JVM (its PID file names it); returns the PID."""
        pid = int((self.state / f"kafka-{self.port}" / "broker.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return pid


def test_kafka_broker_killed_and_started_again(
    own_broker: OwnBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    for key, value in isolated_env(own_broker.bootstrap, state).items():
        monkeypatch.setenv(key, value)

    def broker_down(p: FaultPipeline) -> None:
        pid = own_broker.kill()
        p.say(f"test: the Kafka broker (pid {pid}) killed; down 6 s")
        time.sleep(6)
        own_broker.run("start")
        p.say("test: the Kafka broker started again")
        # A producer whose records the broker did not acknowledge within send_timeout_s exits non-zero by design
        # (resending could duplicate; its restart continues after the topic's last stored trade): a deployment
        # restarts it, so the test does, for 15 s after the broker is back.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for service in p.services:
                if not service.alive:
                    p.say(f"test: {service.name} exited {service.proc and service.proc.returncode}: restarting it")
                    p.process_wait(service.name)
                    p.start_again(service.name)
            time.sleep(0.5)

    tape = tape_of(tmp_path)
    steps = [Step(10_000, "SIGKILL the Kafka broker", broker_down)]
    _, out, code = run_faulted(tape, tmp_path, steps, speed=SPEED)
    verify(tape, state, tmp_path, out, code)


# ------------------------------------------------------------------------------------------------ bad input


#: Records no ingest writes, each with what the aggregator must say of it (a part of its dead-letter reason).
BAD_RECORDS: list[tuple[bytes, str]] = [
    (b'{"type":"trades","s":"BTCUSDT","trades":[{"a":1', "not JSON"),
    (b'{"type":"trades","s":"BTCUSDT","trades":[{"a":"12","p":1.5,"q":"1","f":1,"l":1,"T":1769903700000,"m":true}]}',
     "trades[0]"),
    (b'{"type":"trades","s":"BTCUSDT","trades":[{"a":99999999999,"p":"1.5","q":"1","f":1,"l":1,"T":99999999999999,'
     b'"m":true}]}', "trades[0]"),
    (b'{"type":"trades","s":"BTCUSDT","trades":[{"a":99999999998,"p":"1' + b"0" * 600_000 + b'","q":"1","f":1,'
     b'"l":1,"T":1769903700000,"m":false}]}', "trades[0]"),
]  # fmt: skip


def inject_bad_records(p: FaultPipeline) -> None:
    async def produce() -> None:
        producer = make_producer(p.settings.kafka, client_suffix="chaos-bad-input")
        await producer.start()
        try:
            for value, _ in BAD_RECORDS:
                await producer.send_and_wait(p.settings.kafka.topics.trades, value, key=b"BTCUSDT")
        finally:
            await producer.stop()

    asyncio.run(produce())


def dead_letters(kafka: KafkaSettings) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        consumer = make_consumer(kafka, group_id=None, client_suffix="chaos-dead-letters")
        await consumer.start()
        try:
            ends = await end_offsets(kafka, kafka.topics.dead_letter)
            found: list[dict[str, Any]] = []
            for partition, end in ends.items():
                tp = TopicPartition(kafka.topics.dead_letter, partition)
                consumer.assign([tp])
                await consumer.seek_to_beginning(tp)
                while await consumer.position(tp) < end:
                    for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                        found.append(json.loads(record.value))
            return found
        finally:
            await consumer.stop()

    return asyncio.run(read())


def test_bad_records_in_trades_are_dead_lettered_and_nothing_valid_is_lost(state: Path, tmp_path: Path) -> None:
    tape = tape_of(tmp_path)
    steps = [Step(10_000, f"{len(BAD_RECORDS)} bad records into trades", inject_bad_records)]
    pipeline, out, code = run_faulted(tape, tmp_path, steps, speed=SPEED)
    verify(tape, state, tmp_path, out, code, dead_letters=len(BAD_RECORDS))
    letters = dead_letters(pipeline.settings.kafka)
    assert len(letters) == len(BAD_RECORDS), [(d["service"], d["reason"]) for d in letters]
    for letter, (value, reason) in zip(sorted(letters, key=lambda d: d["offset"]), BAD_RECORDS, strict=True):
        assert letter["service"] == "aggregator" and letter["topic"] == pipeline.settings.kafka.topics.trades
        assert reason in letter["reason"], letter["reason"]
        assert letter["value"] == value.decode()
