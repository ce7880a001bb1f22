"""``/healthz`` on the real services against the real broker (services/shared/liveness.py): 503 with a reason when
the event loop is blocked or a consumer loop stopped polling, 200 while healthy and while a consumer waits on purpose.

Each service runs in this process (its real ``serve``/worker/service coroutine, real Kafka consumer, real heartbeat and
liveness thread). The loop is blocked the way a wedged service blocks it: synchronously, in the loop's own thread
(``block_loop_and_probe`` joins a probing thread from inside the loop). A consumer stops polling when its real
``getmany`` is made to wait on an event the test releases afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from decimal import Decimal
from typing import Any

import pytest
from ports import free_port

from services.aggregator.app import checkpoint_topic
from services.aggregator.clock import ManualClock
from services.aggregator.worker import AggregatorWorker
from services.core.models import Kline
from services.finalized_writer import finalized_spec
from services.gateway.server import Gateway
from services.gateway.server import serve as serve_gateway
from services.ingest.connections import ConnectionOptions
from services.ingest.service import IngestService, IngestTuning
from services.replay import GeneratorFeed, ReplayConfig, ReplayExchange
from services.shared import clickhouse
from services.shared.kafka import delete_topics, make_producer
from services.shared.lifecycle import HealthServer, Shutdown
from services.shared.liveness import PollingConsumer
from services.shared.messages import encode_kline, kline_key
from services.shared.settings import Settings
from services.writers import serve as serve_writers
from services.writers.engine import WriterEngine
from services.writers.ports import InsertFn

pytestmark = pytest.mark.integration

LOOP_STALL_S = 1.0
POLL_STALE_S = 3.0


def with_liveness(settings: Settings, **service: Any) -> Settings:
    """Short liveness bounds, the liveness thread on a free port, and a consumer group of this test's own."""
    update = {
        "liveness_loop_stall_s": LOOP_STALL_S,
        "liveness_poll_stale_s": POLL_STALE_S,
        "liveness_port": free_port(),
        "shutdown_grace_s": 5.0,
        **service,
    }
    return settings.model_copy(
        update={
            "service": settings.service.model_copy(update=update),
            "kafka": settings.kafka.model_copy(update={"client_id": f"t-{uuid.uuid4().hex[:10]}"}),
        }
    )


def probe(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def block_loop_and_probe(port: int, seconds: float = LOOP_STALL_S + 0.8) -> tuple[int, dict[str, Any]]:
    """Called from the event loop: blocks it (as a wedged service would) while a thread probes after ``seconds``."""
    answers: list[tuple[int, dict[str, Any]]] = []
    prober = threading.Thread(target=lambda: (time.sleep(seconds), answers.append(probe(port))))
    prober.start()
    prober.join()  # the loop's thread waits here: nothing else of the loop runs until the probe has its answer
    (answer,) = answers
    return answer


async def until_status(port: int, status: str, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        code, body = await asyncio.to_thread(probe, port)
        if body["status"] == status:
            assert code == (200 if status == "alive" else 503), (code, body)
            return body
        assert time.monotonic() < deadline, f"/healthz is {body}, not {status} after {timeout_s} s"
        await asyncio.sleep(0.2)


@contextlib.contextmanager
def polling_stopped(consumer: Any) -> Any:
    """The real consumer's ``getmany`` waits until the block ends (a consumer loop stuck, its event loop not)."""
    assert isinstance(consumer, PollingConsumer)
    inner = consumer._consumer
    release = asyncio.Event()

    async def stuck(*_args: Any, **_options: Any) -> dict[Any, Any]:
        await release.wait()
        return {}

    inner.getmany = stuck
    try:
        yield
    finally:
        del inner.getmany
        release.set()


async def assert_wedged_then_alive(port: int) -> None:
    code, body = block_loop_and_probe(port)
    assert code == 503 and body["status"] == "wedged", body
    assert body["reason"].startswith("the event loop has not turned for "), body
    assert body["loop_lag_s"] > LOOP_STALL_S / 2, body
    await until_status(port, "alive")


# --- writers: aiokafka consumers in a getmany loop ------------------------------------------------------------


def kline(i: int) -> Kline:
    t = 1_700_000_040_000 + i * 60_000
    p = Decimal(20_000 + i)
    v = Decimal("1.5")
    return Kline("BTCUSDT", "1m", t, t + 59_999, 10 * i, 10 * i + 2, p, p + 1, p - 1, p, v, 3, True, v * p,
                 v / 2, v * p / 2, 0, "live")  # fmt: skip


async def produce(settings: Settings, topic: str, values: Sequence[tuple[bytes, bytes]]) -> None:
    producer = make_producer(settings.kafka, client_suffix="test-liveness")
    await producer.start()
    try:
        for key, value in values:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def test_writers_healthz_wedged_stale_and_alive_while_retrying_clickhouse(settings: Settings) -> None:
    s = with_liveness(settings, writers_http_port=0)
    client = clickhouse.connect(s.clickhouse)
    clickhouse.apply_schema(client, s.clickhouse)
    outage_until = [0.0]
    failed = [0]

    def flaky(_kind: str, real: InsertFn) -> InsertFn:
        def insert(rows: Any, token: str) -> None:
            if time.monotonic() < outage_until[0]:
                failed[0] += 1
                raise clickhouse.ClickHouseUnavailable("injected: ClickHouse is down")
            real(rows, token)

        return insert

    shutdown = Shutdown(s.service.shutdown_grace_s)
    started: asyncio.Future[tuple[list[WriterEngine], HealthServer]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve_writers(
            s,
            ["finalized"],
            shutdown,
            wrap_insert=flaky,
            engine_options={"retry_max_s": 0.3},
            started=lambda e, h: started.set_result((e, h)),
        )
    )
    try:
        (engine,), health = await asyncio.wait_for(started, 30)
        port = health.liveness_port
        assert port is not None
        body = await until_status(port, "alive")
        assert set(body["polled_ago_s"]) == {"finalized_writer"}

        # ClickHouse down for twice the poll bound: the writer waits on its retry on purpose, polling meanwhile.
        outage_until[0] = time.monotonic() + 2 * POLL_STALE_S
        await produce(
            s, finalized_spec(s).topic, [(kline_key("BTCUSDT", "1m"), encode_kline(kline(i))) for i in range(5)]
        )
        while time.monotonic() < outage_until[0]:
            code, body = await asyncio.to_thread(probe, port)
            assert code == 200 and body["status"] == "alive", body
            await asyncio.sleep(0.3)
        assert failed[0] >= 3 and engine.metrics()["paused"] == 1

        await assert_wedged_then_alive(port)

        with polling_stopped(engine._consumer):
            body = await until_status(port, "stale", timeout_s=POLL_STALE_S + 5)
            assert body["reason"].startswith("finalized_writer has not polled for "), body
            code, in_loop = await asyncio.to_thread(probe, health.port)  # the HTTP port judges the same way
            assert code == 503 and in_loop["status"] == "stale"
        await until_status(port, "alive")
    finally:
        shutdown.request("test over")
        assert await asyncio.wait_for(task, 30) == 0


# --- gateway: a consumer without a group ---------------------------------------------------------------------


async def test_gateway_healthz_wedged_stale_and_alive(settings: Settings) -> None:
    s = with_liveness(settings)
    s = s.model_copy(update={"gateway": s.gateway.model_copy(update={"http_port": 0})})
    shutdown = Shutdown(s.service.shutdown_grace_s)
    started: asyncio.Future[tuple[Gateway, HealthServer]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_gateway(s, shutdown, started=lambda g, h: started.set_result((g, h))))
    try:
        gateway, health = await asyncio.wait_for(started, 30)
        port = health.liveness_port
        assert port is not None
        body = await until_status(port, "alive")
        assert set(body["polled_ago_s"]) == {"gateway feed"}
        await assert_wedged_then_alive(port)
        assert gateway.feed is not None
        with polling_stopped(gateway.feed._consumer):
            body = await until_status(port, "stale", timeout_s=POLL_STALE_S + 5)
            assert body["reason"].startswith("gateway feed has not polled for "), body
        await until_status(port, "alive")
    finally:
        shutdown.request("test over")
        assert await asyncio.wait_for(task, 15) == 0


# --- aggregator: the Faust consumer's batch fetch -----------------------------------------------------------------


async def test_aggregator_healthz_wedged_and_alive_and_a_flow_control_pause_is_live(settings: Settings) -> None:
    s = with_liveness(settings)
    s = s.model_copy(update={"aggregator": s.aggregator.model_copy(update={"http_port": 0})})
    worker = AggregatorWorker(s, ManualClock())
    await worker.start()
    try:
        assert worker.engine is not None and worker.http is not None
        port = worker.http.liveness_port
        assert port is not None
        deadline = time.monotonic() + 30
        while not worker.engine.ready:
            assert time.monotonic() < deadline, "aggregator not ready"
            await asyncio.sleep(0.1)
        body = await until_status(port, "alive")
        assert set(body["polled_ago_s"]) == {"aggregator fetch"}
        await assert_wedged_then_alive(port)

        # Flow control: the output is full, so the fetch loop waits for room instead of fetching, for longer
        # than the poll bound. The engine's own wait re-evaluates; the heartbeat asks why: live, with the reason.
        engine = worker.engine
        with patched(engine, "has_room", lambda: False):
            deadline = time.monotonic() + POLL_STALE_S + 2
            while time.monotonic() < deadline:
                code, body = await asyncio.to_thread(probe, port)
                assert code == 200, body
                await asyncio.sleep(0.3)
            assert body["paused"].get("aggregator fetch", "").startswith("flow control"), body
            assert body["polled_ago_s"]["aggregator fetch"] < POLL_STALE_S
        await until_status(port, "alive")
    finally:
        await worker.stop()
        await delete_topics(s.kafka, [checkpoint_topic(s)])


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Callable[..., Any]) -> Any:
    setattr(obj, name, value)
    try:
        yield
    finally:
        delattr(obj, name)


# --- ingest: no consumer; its tick loop (reorder windows, backfill) must keep turning -----------------------------


@contextlib.asynccontextmanager
async def ingest_running(
    settings: Settings, ex: ReplayExchange, stale_after_s: float
) -> AsyncIterator[tuple[IngestService, int]]:
    """Ingest on ``ex`` (BTCUSDT) with short liveness bounds, ready; the service and its liveness port. At the
    end it is stopped and must exit 0."""
    tuning = IngestTuning(connections=ConnectionOptions(stale_after_s=stale_after_s, open_timeout_s=3.0), tick_s=0.01)
    s = with_liveness(settings, ingest_http_port=0)
    market = s.market.model_copy(update={"ws_url": ex.ws_url, "rest_url": ex.rest_url, "symbols": ("BTCUSDT",)})
    service = IngestService(s.model_copy(update={"market": market}), tuning)
    task = asyncio.create_task(service.run())
    try:
        deadline = time.monotonic() + 20
        while not service.ready():
            assert not task.done() and time.monotonic() < deadline, "ingest not ready"
            await asyncio.sleep(0.05)
        assert service.health is not None and service.health.liveness_port is not None
        yield service, service.health.liveness_port
    finally:
        service.shutdown.request("test over")
        assert await asyncio.wait_for(task, 15) == 0


async def test_ingest_healthz_wedged_and_alive(settings: Settings) -> None:
    feed = GeneratorFeed(symbols=("BTCUSDT",), seed=7, duration_ms=60_000)
    async with (
        ReplayExchange(ReplayConfig(feed=feed, speed=60, autostart="never")) as ex,
        ingest_running(settings, ex, stale_after_s=5.0) as (_service, port),
    ):
        ex.start_feed()
        body = await until_status(port, "alive")
        assert set(body["polled_ago_s"]) == {"ingest tick", "ingest stream group-1"}
        await assert_wedged_then_alive(port)


async def test_ingest_healthz_stale_when_a_stream_supervisor_hangs(settings: Settings) -> None:
    """A stream group's supervisor that hangs (here: closing a dropped connection never returns) stops polling
    while the event loop and the tick loop turn: ``/healthz`` says stale and names the group; once it is
    released, the group reconnects and the process is alive again."""
    feed = GeneratorFeed(symbols=("BTCUSDT",), seed=7, duration_ms=600_000)
    async with (
        ReplayExchange(ReplayConfig(feed=feed, speed=1)) as ex,
        ingest_running(settings, ex, stale_after_s=30.0) as (service, port),
    ):
        await until_status(port, "alive")
        (group,) = service.pool.groups
        conn = group.connection
        assert conn is not None
        release = asyncio.Event()
        close = conn.close

        async def hung_close() -> None:
            await release.wait()
            await close()

        conn.close = hung_close  # type: ignore[method-assign]
        ex.faults.drop_connections()
        body = await until_status(port, "stale", timeout_s=POLL_STALE_S + 10)
        assert "ingest stream group-1" in body["reason"], body
        release.set()
        body = await until_status(port, "alive", timeout_s=20)
        assert service.pool.stats.reconnects >= 1
