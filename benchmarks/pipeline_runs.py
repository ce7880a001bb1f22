"""What the whole-pipeline benchmarks share: an isolated run of ``klines run``'s pipeline, sampled every 0.25 s.

Used by ``bench_catchup.py`` and ``bench_scale.py`` (import it as ``pipeline_runs``: each script puts its own
directory on ``sys.path``). Not a benchmark itself (its name does not start with ``bench_``, so ``make bench``
does not run it).

* :class:`Run`: one isolated pipeline run (own state directory under ``/tmp/klines-bench/``, chDB directory,
  ports, topic names and client id; its topics and directory are removed by :meth:`Run.cleanup`), played like
  ``klines run --until-exhausted`` (:meth:`Run.play`);
* :class:`Sampler`: a thread that reads every service's ``/metrics.json``, the exchange's
  ``/_control/status``, each process's CPU seconds and the aggregator's RSS every :data:`SAMPLE_S`;
* :func:`windows`: rates of the sampled counters per :data:`WINDOW_S` of wall time, with gauges at each
  window's end and how busy the machine's CPUs were;
* :func:`bare_consumer`: the raw client limit, a bare aiokafka consumer reading a whole topic without decoding.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402

from services.runner import LocalPipeline, RunOptions, RunSummary, Service  # noqa: E402
from services.shared.kafka import end_offsets  # noqa: E402
from services.shared.settings import Settings, load_settings  # noqa: E402

MAJORS = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "TRXUSDT")
START = "2026-01-01T00:00:00Z"
SAMPLE_S = 0.25
WINDOW_S = 5.0


def symbols(count: int) -> list[str]:
    """``count`` symbols: the majors the exchange knows, then generated names (their activity from the name)."""
    names = list(MAJORS[:count])
    names += [f"X{k:03d}USDT" for k in range(count - len(names))]
    return names


def replay_options(
    names: list[str], *, speed: float, market_duration: str, intervals: list[str], **extra: Any
) -> RunOptions:
    """``klines run``'s options for a benchmark: a generated market of ``names`` from :data:`START`, played until
    the exchange is exhausted, in the namespace :meth:`Run.create` gives the run (so not a fresh one of its own),
    with a drain that waits up to 2 minutes without progress (a backlog at the stop is the point of some runs)."""
    return RunOptions(
        offline=True,
        until_exhausted=True,
        speed=speed,
        market_duration=market_duration,
        start=START,
        symbols=names,
        intervals=intervals,
        fresh=False,
        drain_stall_s=120,
        **extra,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_env(name: str, state: Path) -> dict[str, str]:
    """Own state directory, chDB directory, topics, consumer groups (client id) and ports for one run."""
    return {
        "KAFKA_BOOTSTRAP": os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        "CLICKHOUSE_DSN": f"chdb://{state / 'chdb'}",
        "KLINES_SERVICE__STATE_DIR": str(state),
        "KLINES_KAFKA__TOPICS__TRADES": f"{name}.trades",
        "KLINES_KAFKA__TOPICS__FINALIZED": f"{name}.klines.finalized",
        "KLINES_KAFKA__TOPICS__SNAPSHOTS": f"{name}.klines.snapshots",
        "KLINES_KAFKA__TOPICS__DEAD_LETTER": f"{name}.dead-letter",
        "KLINES_KAFKA__CLIENT_ID": name,
        "KLINES_AGGREGATOR__HTTP_PORT": str(free_port()),
        "KLINES_SERVICE__INGEST_HTTP_PORT": str(free_port()),
        "KLINES_SERVICE__WRITERS_HTTP_PORT": str(free_port()),
        "KLINES_GATEWAY__HTTP_PORT": str(free_port()),
    }


def read_metrics(service: Service | None) -> dict[str, Any] | None:
    """A running service's figures: ``/metrics.json``, or ``/metrics`` where that is still JSON; None if it does
    not answer (within 5 s: a busy event loop answers late, not never)."""
    if service is None or not service.alive:
        return None
    for path in ("/metrics.json", "/metrics"):
        answer = service.get(path, timeout=5.0)
        if isinstance(answer, dict):
            return answer
    return None


def num(metrics: dict[str, Any] | None, key: str) -> int | None:
    """An integer figure of a ``/metrics`` answer; None when it is missing or not a number."""
    value = (metrics or {}).get(key)
    return int(value) if isinstance(value, int | float) else None


def stored_rows(writers: dict[str, Any] | None, writer: str = "finalized_writer") -> int | None:
    """One writer's ``rows_inserted`` (the top-level figure counts both writers' rows)."""
    own = ((writers or {}).get("writers") or {}).get(writer)
    return num(own, "rows_inserted") if own else None


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from ``/proc/stat``."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (its own threads), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_memory(pid: int) -> tuple[int, int] | None:
    """(RSS, peak RSS) of ``pid`` in bytes (``VmRSS``, ``VmHWM`` of ``/proc/<pid>/status``), None once it is gone."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    found[name] = int(value.split()[0]) * 1024
    except OSError:
        return None
    return (found["VmRSS"], found["VmHWM"]) if len(found) == 2 else None


# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class Sample:
    """What every service said at one moment (None: it did not answer)."""

    t: float
    sent: int | None
    published: int | None
    applied: int | None
    finalized: int | None
    lag: int | None
    unconfirmed: int | None
    stored: int | None
    cpu: tuple[int, int]
    process_cpu: dict[str, float] = field(default_factory=dict)
    snapshots_sent: int | None = None  # the aggregator's snapshot records
    snapshots_stored: int | None = None  # the snapshot writer's rows_inserted
    aggregator_rss: int | None = None  # bytes
    aggregator_peak_rss: int | None = None  # bytes, the process's high-water mark so far


class Sampler(threading.Thread):
    """Reads the exchange's status and each service's ``/metrics`` every :data:`SAMPLE_S` until stopped."""

    def __init__(self, pipeline: LocalPipeline) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pipeline = pipeline
        self.samples: list[Sample] = []
        self.done = threading.Event()

    def metrics(self, name: str) -> dict[str, Any] | None:
        return read_metrics(next((s for s in self.pipeline.services if s.name == name), None))

    def run(self) -> None:
        # The exchange and the three services are asked at once: one whose event loop is busy for seconds must
        # not leave the others unsampled meanwhile.
        with ThreadPoolExecutor(4, thread_name_prefix="sampler") as pool:
            while not self.done.is_set():
                self.sample(pool)

    def sample(self, pool: ThreadPoolExecutor) -> None:
        t = time.monotonic()
        replay = self.pipeline.replay is not None
        asked = [pool.submit(self.pipeline._replay_status if replay else lambda: None)]
        asked += [pool.submit(self.metrics, n) for n in ("ingest", "aggregator", "writers")]
        status, ingest, aggregator, writers = (future.result() for future in asked)
        procs = {s.name: s.proc for s in [*self.pipeline.services, self.pipeline.replay] if s is not None}
        alive = {name: p for name, p in procs.items() if p is not None and p.poll() is None}
        cpu = {name: process_cpu_s(p.pid) for name, p in alive.items()}
        memory = process_memory(alive["aggregator"].pid) if "aggregator" in alive else None
        self.samples.append(
            Sample(
                t=t,
                sent=LocalPipeline._sent(status),
                published=num(ingest, "trades_published"),
                applied=num(aggregator, "trades_applied"),
                finalized=num(aggregator, "klines_finalized"),
                lag=num(aggregator, "lag"),
                unconfirmed=num(aggregator, "unconfirmed_finalized"),
                stored=stored_rows(writers),
                cpu=machine_cpu(),
                process_cpu={k: v for k, v in cpu.items() if v is not None},
                snapshots_sent=num(aggregator, "snapshots_sent"),
                snapshots_stored=stored_rows(writers, "snapshot_writer"),
                aggregator_rss=None if memory is None else memory[0],
                aggregator_peak_rss=None if memory is None else memory[1],
            )
        )
        self.done.wait(max(0.0, SAMPLE_S - (time.monotonic() - t)))

    def stop(self) -> None:
        self.done.set()
        self.join(10)


def cumulative(samples: list[Sample], key: str) -> list[tuple[float, int]]:
    """(t, running total) of a counter over the samples that have it; a counter that goes down began again
    (its service restarted), so what it counts from then on is added."""
    out: list[tuple[float, int]] = []
    total = previous = 0
    for sample in samples:
        value = getattr(sample, key)
        if value is None:
            continue
        total += value - previous if value >= previous else value
        previous = value
        out.append((sample.t, total))
    return out


def value_at(series: list[tuple[float, int]], t: float) -> int:
    """The last value of ``series`` at or before ``t`` (0 before its first)."""
    value = 0
    for when, v in series:
        if when > t:
            break
        value = v
    return value


def last_known(samples: list[Sample], key: str, t: float) -> Any:
    value = None
    for sample in samples:
        if sample.t > t:
            break
        if getattr(sample, key) is not None:
            value = getattr(sample, key)
    return value


def windows(
    samples: list[Sample],
    start: float,
    end: float,
    counters: tuple[str, ...] = ("sent", "published", "applied", "finalized", "stored"),
    gauges: tuple[str, ...] = ("lag", "unconfirmed"),
) -> list[list[Any]]:
    """One row per :data:`WINDOW_S` from ``start`` to ``end``: ``[from, to, *rates of counters, *gauges at its
    end, share of all CPUs busy]`` (seconds relative to ``start``; rates per second of wall time; a rate is None
    when no sample in the window has the counter)."""
    series = {k: cumulative(samples, k) for k in counters}
    rows = []
    t = start
    while t < end - 0.01:
        stop = end if end - (t + WINDOW_S) < 1.0 else t + WINDOW_S  # no window shorter than a second
        span = stop - t
        rates = [
            (value_at(series[k], stop) - value_at(series[k], t)) / span
            if any(t < when <= stop for when, _ in series[k])
            else None  # the service did not answer in this window: its rate is unknown, not 0
            for k in counters
        ]
        before = next((s.cpu for s in samples if s.t >= t), samples[-1].cpu)
        after = next((s.cpu for s in samples if s.t >= stop), samples[-1].cpu)
        busy = (after[0] - before[0]) / max(1, after[1] - before[1])
        rows.append([t - start, stop - start, *rates, *(last_known(samples, g, stop) for g in gauges), busy])
        t = stop
    return rows


def rate_text(rate: float | None, width: int = 12) -> str:
    """A window's rate for a table: ``-`` when unknown (the service did not answer in that window)."""
    return f"{'-' if rate is None else f'{rate:,.0f}':>{width}}"


def print_windows(
    rows: list[list[Any]], rate_heads: tuple[str, ...], gauge_heads: tuple[tuple[str, int, Callable[[Any], str]], ...]
) -> None:
    """The rows of :func:`windows` as a table: the window, a column per rate (``rate_heads``), a column per gauge
    (``(head, width, format)``; ``-`` when unknown) and the CPU share; the caller prints what the columns mean."""
    line = f"  {'window':<13}" + "".join(f"{h:>12}" for h in rate_heads)
    print(line + "".join(f"{h:>{width}}" for h, width, _ in gauge_heads) + f"{'CPU':>6}")
    rates = len(rate_heads)
    for row in rows:
        line = f"  {f'{row[0]:.0f}-{row[1]:.0f} s':<13}" + "".join(rate_text(r) for r in row[2 : 2 + rates])
        for (_, width, shown), value in zip(gauge_heads, row[2 + rates : -1], strict=True):
            line += f"{'-' if value is None else shown(value):>{width}}"
        print(line + f"{row[-1]:>6.0%}")


def print_cpu_seconds(samples: list[Sample], trades: int) -> dict[str, float]:
    """Print each process's CPU seconds over the whole run and the aggregator's trades per CPU-second; return them."""
    cpu = cpu_seconds(samples)
    print(
        "  CPU seconds by process over the whole run (start to stop): "
        + ", ".join(f"{name} {value:.1f}" for name, value in sorted(cpu.items(), key=lambda kv: -kv[1]))
    )
    if cpu.get("aggregator"):
        print(f"  aggregator: {trades / cpu['aggregator']:,.0f} trades per CPU-second of its own (whole run)")
    return cpu


def print_verdict(run: Run, summary: RunSummary, finalized: int) -> bool:
    """Print the run's checks (finalized == stored, DATA_LOSS, the summary's verdict); True when all hold."""
    losses = max(summary.data_loss, run.logged_losses())
    equal = summary.klines_stored == finalized
    print(
        f"  finalized {finalized:,}, stored {summary.klines_stored:,} (ClickHouse FINAL): "
        f"{'equal' if equal else 'DIFFERENT'}; DATA_LOSS {losses}; run: "
        + ("OK, nothing lost" if summary.exit_code == 0 else "FAILED: " + "; ".join(summary.problems()))
    )
    return summary.exit_code == 0 and losses == 0 and equal


def cpu_seconds(samples: list[Sample]) -> dict[str, float]:
    """Each process's CPU seconds at its last reading (its whole run, for a process that stopped before the end)."""
    cpu: dict[str, float] = {}
    for sample in samples:
        cpu.update(sample.process_cpu)
    return cpu


# ------------------------------------------------------------------------------------------------ a run


def play_to_the_end(pipeline: LocalPipeline) -> RunSummary:
    """Start, watch until the tape is exhausted, drain, stop (every process, even after a failure) and print the
    summary, as ``klines run`` does."""
    try:
        pipeline.start()
        reason = pipeline.watch(lambda: False)
        pipeline.say(f"stopping: {reason}")
        pipeline.drain_and_stop()
    finally:
        for service in pipeline.services:
            service.stop(2)
        if pipeline.replay is not None:
            pipeline.replay.stop(5)
    summary = pipeline.report()
    for line in summary.lines():
        print(line, file=pipeline.out)
    return summary


@dataclass
class Run:
    """One isolated pipeline run: its name, state directory, settings and options."""

    name: str
    state: Path
    settings: Settings
    options: RunOptions

    @classmethod
    def create(cls, kind: str, options: RunOptions) -> Run:
        name = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
        state = Path("/tmp") / "klines-bench" / name
        state.mkdir(parents=True, exist_ok=True)
        os.environ.update(isolated_env(name, state))  # the pipeline hands this process's environment on
        options.replay_port = free_port()
        return cls(name, state, load_settings(None), options)

    def play(self, pipeline: LocalPipeline, sampler: Sampler) -> RunSummary:
        """Start, watch until the tape is exhausted, drain, stop and report, as ``klines run`` does."""
        sampler.start()
        try:
            return play_to_the_end(pipeline)
        finally:
            sampler.stop()

    def logged_losses(self) -> int:
        """DATA_LOSS lines in every service log of the run."""
        return sum(
            log.read_text(errors="replace").count('"log_type": "DATA_LOSS"')
            for log in (self.state / "logs").glob("*.log")
        )

    async def cleanup(self, keep: bool) -> None:
        if keep:
            return
        kafka = self.settings.kafka
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap, request_timeout_ms=kafka.request_timeout_ms)
        await admin.start()
        try:
            doomed = [t for t in await admin.list_topics() if self.name in t]
            if doomed:
                await admin.delete_topics(doomed)
        finally:
            await admin.close()
        shutil.rmtree(self.state, ignore_errors=True)


async def bare_consumer(settings: Settings, topic: str | None = None) -> tuple[int, float]:
    """A bare aiokafka consumer reads every record of ``topic`` (default: the trades topic), without decoding:
    (records, seconds)."""
    topic = topic or settings.kafka.topics.trades
    ends = await end_offsets(settings.kafka, topic)
    total = sum(ends.values())
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        count = 0
        started = progress = time.perf_counter()
        while count < total:
            for records in (await consumer.getmany(timeout_ms=1000, max_records=10_000)).values():
                count += len(records)
                progress = time.perf_counter()
            if time.perf_counter() - progress > 30:
                raise RuntimeError(f"the bare consumer read {count:,} of {total:,} records, then nothing for 30 s")
        return count, time.perf_counter() - started
    finally:
        await consumer.stop()
