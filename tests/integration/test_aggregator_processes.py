"""Aggregator workers as real processes on the real broker: SIGKILL at random points, and a two-worker rebalance.

Each worker is ``python -m services.aggregator --clock manual`` with the test's topics in its environment; the
test sets market time over HTTP only once every trade is in, so nothing closes early. After the last restart
every kline the oracle computes must be on ``klines.finalized`` with the oracle's values in every copy
(duplicates from a replay are allowed: downstream keeps one per version).

:func:`crash_rounds` is also what ``benchmarks/aggregator_crash_loop.py`` runs for many more rounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import pytest
from aiokafka.partitioner import murmur2
from ports import free_port

from services.aggregator.app import checkpoint_topic
from services.core.models import Kline
from services.shared.kafka import delete_topics
from services.shared.messages import decode_kline, encode_trade_batch
from services.shared.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_aggregator_stream import (
    DENSE_GAPS_MS,
    INTERVALS,
    SPARSE_GAPS_MS,
    batches,
    end_of_stream,
    oracle,
    produce,
    read_topic,
    scripted_trades,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT"]


def worker_env(settings: Settings, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLINES_")}
    topics = settings.kafka.topics
    env.update(
        KLINES_CONFIG=str(REPO / "config" / "klines.toml"),
        KAFKA_BOOTSTRAP=settings.kafka.bootstrap,
        KLINES_KAFKA__TOPICS__TRADES=topics.trades,
        KLINES_KAFKA__TOPICS__FINALIZED=topics.finalized,
        KLINES_KAFKA__TOPICS__SNAPSHOTS=topics.snapshots,
        KLINES_KAFKA__TOPICS__DEAD_LETTER=topics.dead_letter,
        KLINES_KAFKA__TRADES_PARTITIONS=str(settings.kafka.trades_partitions),
        KLINES_KAFKA__KLINES_PARTITIONS=str(settings.kafka.klines_partitions),
        KLINES_MARKET__INTERVALS=json.dumps(list(settings.market.intervals)),
        KLINES_AGGREGATOR__HTTP_PORT=str(port),
        KLINES_AGGREGATOR__SNAPSHOT_INTERVAL_MS=str(settings.aggregator.snapshot_interval_ms),
        KLINES_AGGREGATOR__GRACE_MS=str(settings.aggregator.grace_ms),
        KLINES_SERVICE__STATE_DIR=str(settings.service.state_dir),
        KLINES_SERVICE__LOG_FORMAT="json",
        KLINES_SERVICE__SHUTDOWN_GRACE_S="8",
        PYTHONUNBUFFERED="1",
    )
    return env


class WorkerProcess:
    """One ``python -m services.aggregator --clock manual`` process and its HTTP endpoints."""

    def __init__(self, settings: Settings, log: IO[bytes], *, instance_id: str | None = None) -> None:
        self.port = free_port()
        args = [sys.executable, "-m", "services.aggregator", "--clock", "manual"]
        if instance_id is not None:
            args += ["--instance-id", instance_id]
        self.proc = subprocess.Popen(
            args, cwd=REPO, env=worker_env(settings, self.port), stdout=log, stderr=subprocess.STDOUT
        )

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
                result: dict[str, Any] = json.loads(response.read())
                return result
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def set_clock(self, now_ms: int) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/clock?now_ms={now_ms}&tick=1", method="POST", data=b""
        )
        with urllib.request.urlopen(request, timeout=5):
            pass

    def metrics(self) -> dict[str, Any]:
        return self.get("/metrics.json") or {}

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 15) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


class GatewayProcess:
    """``python -m services.gateway`` on the test's topics, for its ``/api/snapshot``."""

    def __init__(self, settings: Settings, log: IO[bytes]) -> None:
        self.port = free_port()
        env = worker_env(settings, free_port())
        env.update(KLINES_GATEWAY__HTTP_PORT=str(self.port), KLINES_GATEWAY__HISTORY="auto")
        env.pop("CLICKHOUSE_DSN", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.gateway"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def snapshot(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/snapshot", timeout=2) as response:
                result: dict[str, Any] = json.loads(response.read())
                return result
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(15) == 0


#: The fields of a kline both ``/snapshot`` (the worker's) and ``/api/snapshot`` (the gateway's) carry.
KLINE_FIELDS = ("s", "i", "t", "T", "f", "L", "o", "h", "l", "c", "v", "n", "x", "q", "V", "Q")


class FullSnapshotCheck:
    """The gateway's one answer equals the union of the workers' own answers (each only for its partitions)."""

    def __init__(self, gateway: GatewayProcess, *workers: WorkerProcess) -> None:
        self.gateway, self.workers = gateway, workers
        self.last: tuple[Any, Any] = (None, None)

    def __call__(self) -> bool:
        answers = [w.get("/snapshot") for w in self.workers]
        full = self.gateway.snapshot()
        if full is None or not full["ready"] or any(a is None or not a["klines"] for a in answers):
            self.last = (answers, full)
            return False
        own = sorted(tuple(k[f] for f in KLINE_FIELDS) for a in answers if a is not None for k in a["klines"])
        gateway = sorted(tuple(k[f] for f in KLINE_FIELDS) for k in full["klines"])
        self.last = (sorted(set(own) - set(gateway))[:5], sorted(set(gateway) - set(own))[:5])
        # Mid-rebalance both workers may still answer for one symbol|interval: not yet settled.
        return len({k[:2] for k in own}) == len(own) and own == gateway


async def until(
    condition: Any, timeout_s: float, what: str, *workers: WorkerProcess, last: FullSnapshotCheck | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            states = [{k: w.metrics().get(k) for k in ("ready", "lag", "partitions", "records")} for w in workers]
            seen = "" if last is None else f"; last seen: {last.last}"
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}: {states}{seen}")
        await asyncio.sleep(0.1)


def caught_up(worker: WorkerProcess) -> bool:
    metrics = worker.metrics()
    return bool(metrics.get("ready")) and metrics.get("lag") == 0


async def finish(settings: Settings, worker: WorkerProcess, end_ms: int) -> None:
    """Read everything, move market time to the end, wait for the finalized sends, stop gracefully."""
    await until(lambda: caught_up(worker), 60, "the worker to read every trade", worker)
    worker.set_clock(end_ms)
    await until(lambda: worker.metrics().get("unconfirmed_finalized") == 0, 30, "finalized deliveries", worker)
    await asyncio.sleep(3 * settings.aggregator.snapshot_interval_ms / 1000)
    assert worker.terminate() == 0


async def verify(settings: Settings, streams: dict[str, Any]) -> dict[str, int]:
    """Every oracle kline is on klines.finalized and every copy of it has the oracle's values."""
    want = oracle(streams)
    copies: dict[tuple[str, str, int], list[Kline]] = defaultdict(list)
    for _key, value in await read_topic(settings, settings.kafka.topics.finalized):
        kline = decode_kline(value)[0]
        copies[(kline.s, kline.i, kline.t)].append(kline)
    missing = [key for key in want if key not in copies]
    assert not missing, f"{len(missing)} klines never finalized, e.g. {missing[:3]}"
    for key, expected in want.items():
        for kline in copies[key]:
            assert kline.same_values(expected), (key, kline.differences(expected), copies[key], expected)
    seqs: dict[bytes | None, int] = defaultdict(lambda: -1)
    for key, value in await read_topic(settings, settings.kafka.topics.snapshots):
        seq = decode_kline(value)[1]
        assert seq is not None and seq > seqs[key], f"snapshot seq went back for {key!r}"
        seqs[key] = seq
    duplicated = sum(1 for key in want if len(copies[key]) > 1)
    return {"klines": len(want), "records": sum(len(c) for c in copies.values()), "duplicated": duplicated}


async def produce_slowly(
    settings: Settings, records: list[tuple[bytes | None, bytes]], bursts: int, pause_s: float = 0.1
) -> None:
    step = max(1, len(records) // bursts)
    for start in range(0, len(records), step):
        await produce(settings, records[start : start + step])
        await asyncio.sleep(pause_s)


async def crash_rounds(
    settings: Settings, rounds: int, seed: int, log: IO[bytes], *, minutes: int = 30, dense: bool = False
) -> dict[str, Any]:
    """Feed a scripted stream while SIGKILLing the worker ``rounds`` times at random points; verify.

    A quarter of the kills land during start-up (imports, joining the group, the restore); the others after
    the worker answers HTTP, while a chunk of the stream is still arriving (applying, checkpointing, idle).
    """
    rng = random.Random(seed)
    streams = scripted_trades(SYMBOLS, minutes=minutes, seed=seed, gaps_ms=DENSE_GAPS_MS if dense else SPARSE_GAPS_MS)
    records: list[tuple[bytes | None, bytes]] = [
        (symbol.encode(), encode_trade_batch(symbol, chunk)) for symbol, chunk in batches(streams, seed)
    ]
    cuts = sorted(rng.sample(range(1, len(records)), rounds))
    chunks = [records[a:b] for a, b in zip([0, *cuts], [*cuts, len(records)], strict=True)]
    kills = []
    for chunk in chunks[:-1]:
        worker = WorkerProcess(settings, log, instance_id="crash-test")
        if rng.random() < 0.25:
            feeder = asyncio.create_task(produce(settings, chunk))
            delay = rng.uniform(0.2, 3.0)
            await asyncio.sleep(delay)
            phase = "start-up"
        else:
            await until(lambda w=worker: w.get("/healthz") is not None, 60, "the worker's HTTP")  # type: ignore[misc]
            feeder = asyncio.create_task(produce_slowly(settings, chunk, bursts=10, pause_s=0.2))
            delay = rng.uniform(0.3, 3.5)
            await asyncio.sleep(delay)
            phase = "running"
        kills.append((phase, round(delay, 2), worker.metrics().get("records")))
        worker.kill()
        await feeder
    worker = WorkerProcess(settings, log, instance_id="crash-test")
    await produce(settings, chunks[-1])
    await finish(settings, worker, end_of_stream(streams, settings.aggregator.grace_ms))
    result = await verify(settings, streams)
    return {**result, "trades_records": len(records), "kills": kills}


@pytest.fixture
async def proc_settings(settings: Settings) -> AsyncIterator[Settings]:
    s = settings.model_copy(
        update={
            "market": settings.market.model_copy(update={"intervals": INTERVALS}),
            "aggregator": settings.aggregator.model_copy(update={"snapshot_interval_ms": 200}),
        }
    )
    yield s
    await delete_topics(s.kafka, [checkpoint_topic(s)])


async def test_sigkill_at_random_points_then_restart_loses_and_corrupts_nothing(
    proc_settings: Settings, tmp_path: Path
) -> None:
    with open(tmp_path / "workers.log", "wb") as log:
        result = await crash_rounds(proc_settings, rounds=3, seed=int(time.time()) % 1000, log=log, minutes=20)
    assert result["records"] >= result["klines"]


async def test_two_workers_share_partitions_and_hand_them_over_without_loss(
    proc_settings: Settings, tmp_path: Path
) -> None:
    s = proc_settings
    symbols = [*SYMBOLS, "LTCUSDT"]  # the only one of them on partition 1: every worker gets symbols to own
    everything = set(range(s.kafka.trades_partitions))
    assert {(murmur2(symbol.encode()) & 0x7FFFFFFF) % s.kafka.trades_partitions for symbol in symbols} == everything
    streams = scripted_trades(symbols, minutes=20, seed=5)
    records: list[tuple[bytes | None, bytes]] = [
        (symbol.encode(), encode_trade_batch(symbol, chunk)) for symbol, chunk in batches(streams, 5)
    ]
    quarter = len(records) // 4
    with open(tmp_path / "workers.log", "wb") as log:
        a = WorkerProcess(s, log)
        await produce(s, records[:quarter])
        await until(lambda: caught_up(a) and set(a.metrics()["partitions"]) == everything, 60, "worker A", a)
        b = WorkerProcess(s, log)
        await produce_slowly(s, records[quarter : 2 * quarter], bursts=6)

        def split() -> bool:
            pa, pb = a.metrics().get("partitions"), b.metrics().get("partitions")
            return bool(pa and pb) and set(pa) | set(pb) == everything and not set(pa) & set(pb)

        await until(lambda: split() and caught_up(a) and caught_up(b), 60, "A and B to share the partitions", a, b)
        with GatewayProcess(s, log) as gateway:  # one answer for the current klines of both workers
            check = FullSnapshotCheck(gateway, a, b)
            await until(check, 60, "the gateway's full snapshot (workers only, gateway only)", a, b, last=check)
        feeder = asyncio.create_task(produce_slowly(s, records[2 * quarter : 3 * quarter], bursts=6))
        started = time.monotonic()
        assert a.terminate() == 0  # A leaves: B takes every partition, from A's final checkpoints
        assert time.monotonic() - started < s.service.shutdown_grace_s, "SIGTERM: out within the grace period"
        await feeder
        await until(lambda: caught_up(b) and set(b.metrics().get("partitions", ())) == everything, 60, "B alone", b)
        await produce(s, records[3 * quarter :])
        await finish(s, b, end_of_stream(streams, s.aggregator.grace_ms))
    result = await verify(s, streams)
    assert result["duplicated"] == 0, "graceful hand-overs send no kline twice"
