"""Liveness (services/shared/liveness.py): the verdict from heartbeats and polls, with a clock the test moves."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.aggregator.app import BatchFetcher
from services.shared.lifecycle import HealthServer, StartupError
from services.shared.liveness import Liveness, LivenessServer, PollingConsumer
from services.shared.metrics import LoopHealth, ServiceMetrics
from services.shared.settings import load_settings

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def liveness(clock: FakeClock) -> Liveness:
    return Liveness(loop_stall_s=10.0, poll_stale_s=30.0, clock=clock)


def test_alive_while_the_loop_beats_and_every_poller_polls(liveness: Liveness, clock: FakeClock) -> None:
    fetch = liveness.poller("fetch")
    for _ in range(100):  # 100 s of a healthy process
        clock.advance(1.0)
        liveness.beat()
        fetch.polled()
    verdict = liveness.verdict()
    assert verdict.status == "alive" and verdict.http_status == 200
    assert verdict.polled_ago_s == {"fetch": 0.0}
    assert verdict.to_dict()["loop_lag_s"] == 0.0


def test_a_loop_that_stopped_beating_is_wedged_with_its_silence_as_the_reason(
    liveness: Liveness, clock: FakeClock
) -> None:
    liveness.poller("fetch")
    liveness.beat()
    clock.advance(10.0)
    assert liveness.verdict().status == "alive"  # at the bound: not yet
    clock.advance(2.5)
    verdict = liveness.verdict()
    assert verdict.status == "wedged" and verdict.http_status == 503
    assert verdict.reason == "the event loop has not turned for 12.5 s (bound 10 s)"
    assert verdict.loop_lag_s == pytest.approx(12.5 - liveness.beat_interval_s)
    clock.advance(0.1)
    liveness.beat(lag_s=12.6)  # the loop came back: alive again, and the lag it measured is reported
    assert liveness.verdict().status == "alive"
    assert liveness.verdict().loop_lag_s == 12.6


def test_a_poller_that_stopped_polling_is_stale_while_the_loop_turns(liveness: Liveness, clock: FakeClock) -> None:
    busy = liveness.poller("finalized_writer")
    idle = liveness.poller("snapshot_writer")
    for _ in range(31):
        clock.advance(1.0)
        liveness.beat()
        busy.polled()
    verdict = liveness.verdict()
    assert verdict.status == "stale"
    assert verdict.reason == "snapshot_writer has not polled for 31.0 s (bound 30 s)"
    assert verdict.polled_ago_s == {"finalized_writer": 0.0, "snapshot_writer": 31.0}
    idle.polled()
    assert liveness.verdict().status == "alive"


def test_a_wedged_loop_is_reported_before_a_stale_poller(liveness: Liveness, clock: FakeClock) -> None:
    liveness.poller("fetch")
    clock.advance(40.0)
    assert liveness.verdict().status == "wedged"


def test_registering_counts_as_the_first_poll_and_each_poller_has_its_bound(
    liveness: Liveness, clock: FakeClock
) -> None:
    clock.advance(100.0)
    liveness.beat()
    slow = liveness.poller("slow", bound_s=5.0)
    clock.advance(4.0)
    liveness.beat()
    assert liveness.verdict().status == "alive"
    clock.advance(2.0)
    liveness.beat()
    assert liveness.verdict().reason == "slow has not polled for 6.0 s (bound 5 s)"
    liveness.forget(slow)
    assert liveness.verdict().status == "alive" and liveness.verdict().polled_ago_s == {}
    with pytest.raises(ValueError, match="already registered"):
        liveness.poller("twice")
        liveness.poller("twice")


def test_a_pause_on_purpose_is_live_while_the_loop_turns_and_re_evaluates_it(
    liveness: Liveness, clock: FakeClock
) -> None:
    why: list[str | None] = [None]
    fetch = liveness.poller("fetch", paused=lambda: why[0])
    fetch.polled()
    why[0] = "flow control"
    for _ in range(120):  # two minutes waiting for room, far beyond the 30 s poll bound
        clock.advance(1.0)
        liveness.beat()
    verdict = liveness.verdict()
    assert verdict.status == "alive", verdict
    assert verdict.paused == {"fetch": "flow control"}
    clock.advance(11.0)  # ... but a paused consumer in a loop that stopped turning is not live
    assert liveness.verdict().status == "wedged"
    why[0] = None  # the pause ended but no poll followed: stale once the bound passed since the last beat
    for _ in range(31):
        clock.advance(1.0)
        liveness.beat()
    assert liveness.verdict().status == "stale"


def test_a_pause_check_that_raises_counts_as_not_paused_and_the_heartbeat_goes_on(
    liveness: Liveness, clock: FakeClock
) -> None:
    def broken() -> str | None:
        raise RuntimeError("bug")

    liveness.poller("fetch", paused=broken)
    for _ in range(31):
        clock.advance(1.0)
        liveness.beat()
    verdict = liveness.verdict()
    assert verdict.status == "stale" and verdict.loop_lag_s == 0.0


def test_the_paused_question_is_asked_in_the_loop_never_by_the_verdict(liveness: Liveness) -> None:
    asked: list[str] = []
    liveness.poller("fetch", paused=lambda: asked.append(threading.current_thread().name) or None)
    verdict = threading.Thread(target=liveness.verdict, name="probe")
    verdict.start()
    verdict.join()
    assert asked == []
    liveness.beat()
    assert asked == [threading.current_thread().name]


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Liveness(loop_stall_s=0)


def test_the_bounds_come_from_the_service_settings() -> None:
    settings = load_settings(None, service={"liveness_loop_stall_s": 4.0, "liveness_poll_stale_s": 20.0})
    liveness = Liveness.from_settings(settings.service)
    assert (liveness.loop_stall_s, liveness.poll_stale_s, liveness.beat_interval_s) == (4.0, 20.0, 0.8)
    assert load_settings(None, service={"liveness_port": ""}).service.liveness_port is None
    assert load_settings(None, service={"liveness_port": "8079"}).service.liveness_port == 8079


class FakeConsumer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.assigned = {"t-0"}

    async def getmany(self, *partitions: Any, timeout_ms: int = 0) -> dict[str, list[int]]:
        if self.fail:
            raise ConnectionError("broker gone")
        return {"t-0": [1, 2]}

    def assignment(self) -> set[str]:
        return self.assigned


async def test_every_getmany_of_an_observed_consumer_is_a_poll_even_one_that_failed(
    liveness: Liveness, clock: FakeClock
) -> None:
    inner = FakeConsumer()
    consumer = liveness.observe(inner, "writer")
    assert isinstance(consumer, PollingConsumer)
    clock.advance(20.0)
    assert liveness.verdict().polled_ago_s == {"writer": 20.0}
    assert await consumer.getmany(timeout_ms=0) == {"t-0": [1, 2]}
    assert liveness.verdict().polled_ago_s == {"writer": 0.0}
    assert consumer.assignment() == {"t-0"}  # everything else is the consumer's
    inner.fail = True
    clock.advance(20.0)
    with pytest.raises(ConnectionError):
        await consumer.getmany()
    assert liveness.verdict().polled_ago_s == {"writer": 0.0}


def test_the_aggregator_fetch_loop_names_its_deliberate_pauses() -> None:
    liveness = Liveness()
    fetcher = BatchFetcher(agent=None, topic="trades", liveness=liveness)  # type: ignore[arg-type]
    assert fetcher.pause_reason() is None
    fetcher.waiting_for_room = True
    assert fetcher.pause_reason() is not None and "flow control" in fetcher.pause_reason()  # type: ignore[operator]
    fetcher.waiting_for_room = False

    class Session:
        flow_active = False

    fetcher._session = Session()  # type: ignore[assignment]
    assert fetcher.pause_reason() == "rebalance: the consumer's flow is stopped"
    liveness.beat()
    assert liveness.verdict().paused == {"aggregator fetch": "rebalance: the consumer's flow is stopped"}


def _get(port: int, path: str = "/healthz") -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _text(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return str(response.read().decode())


def test_the_liveness_thread_answers_with_the_verdict_and_only_healthz(liveness: Liveness, clock: FakeClock) -> None:
    server = LivenessServer(liveness, "127.0.0.1", 0)
    server.start()
    try:
        liveness.beat()
        status, body = _get(server.port)
        assert status == 200 and body["status"] == "alive"
        assert set(body) == {"status", "reason", "loop_lag_s", "polled_ago_s", "paused"}
        clock.advance(11.0)
        status, body = _get(server.port)
        assert status == 503 and body["status"] == "wedged" and "bound 10 s" in body["reason"]
        assert _get(server.port, "/readyz")[0] == 404
    finally:
        server.stop()


async def test_health_server_answers_wedged_from_its_thread_while_the_loop_is_blocked() -> None:
    liveness = Liveness(loop_stall_s=0.5, poll_stale_s=30.0)
    exporter = ServiceMetrics("fake", dict)
    health = HealthServer("127.0.0.1", 0, ready=lambda: True, metrics=dict, exporter=exporter, liveness=liveness)
    health.liveness_port = 0
    await health.start()
    try:
        await asyncio.sleep(0.3)
        assert health.liveness_port not in (None, 0)
        port = health.liveness_port
        assert port is not None
        assert (await asyncio.to_thread(_get, port))[0] == 200
        assert (await asyncio.to_thread(_get, health.port))[0] == 200  # in the loop, on the HTTP port
        exposition = await asyncio.to_thread(_text, health.port, "/metrics")
        assert 'klines_service_loop_lag_seconds{service="fake"}' in exposition
        answers: list[tuple[int, dict[str, Any]]] = []
        probe = threading.Thread(target=lambda: (time.sleep(0.9), answers.append(_get(port))))
        probe.start()
        probe.join()  # the event loop is blocked here until the probe has its answer
        ((status, body),) = answers
        assert status == 503 and body["status"] == "wedged", body
        await asyncio.sleep(0.3)  # the loop turns again: alive
        assert (await asyncio.to_thread(_get, port))[0] == 200
    finally:
        await health.stop()
    with pytest.raises(OSError):
        _get(port)


async def test_a_taken_liveness_port_is_a_startup_error_naming_the_key() -> None:
    taken = LivenessServer(Liveness(), "127.0.0.1", 0)
    taken.start()
    try:
        health = HealthServer("127.0.0.1", 0, ready=lambda: True, metrics=dict, exporter=ServiceMetrics("fake", dict))
        health.liveness_port = taken.port
        with pytest.raises(StartupError, match=r"service\.liveness_port"):
            await health.start()
    finally:
        taken.stop()


def test_loop_lag_and_poll_ages_are_prometheus_gauges(liveness: Liveness, clock: FakeClock) -> None:
    liveness.poller("finalized_writer")
    clock.advance(3.0)
    liveness.beat(lag_s=0.25)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LoopHealth("writers", liveness.verdict))
    text = generate_latest(registry).decode()
    assert "# TYPE klines_service_loop_lag_seconds gauge" in text
    assert 'klines_service_loop_lag_seconds{service="writers"} 0.25' in text
    assert 'klines_service_poll_age_seconds{poller="finalized_writer",service="writers"} 3.0' in text
