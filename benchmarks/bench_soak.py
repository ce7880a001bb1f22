"""Soak: the whole pipeline for half an hour at a steady rate with periodic faults; memory must stay flat.

Run: ``KAFKA_BOOTSTRAP=127.0.0.1:19092 .venv/bin/python benchmarks/bench_soak.py [--minutes 30] [--symbols 3]
[--speed 10] [--fault-every 120] [--faults drop,shutdown,stall,429,engine] [--warmup 300] [--sample 5]
[--print-every 60] [--max-slope 25] [--keep]`` (``KAFKA_BOOTSTRAP`` defaults to the local broker).

It runs ``klines run``'s own pipeline (the chaos tier's :class:`harness.FaultPipeline`, a
:class:`~services.runner.LocalPipeline`, in this process) on a generated market from the replay exchange at
``--speed`` (market time per wall time; three symbols at 10x are about 500 trades/s), isolated like the other
benchmarks (own state directory under ``/tmp/klines-bench/``, chDB directory, ports, topics, client id; removed
at the end unless ``--keep``). Every ``--fault-every`` seconds it injects the next fault of ``--faults``, in turn:

* ``drop``: the exchange drops every WebSocket connection (ingest reconnects and backfills over REST);
* ``shutdown``: the exchange sends ``serverShutdown`` and closes the connections 1 s later;
* ``stall``: the exchange sends nothing for 5 s without closing;
* ``429``: REST limited to one ``aggTrades`` page per 3 s while every connection is dropped, lifted after 8 s;
* ``engine``: the writers' embedded ClickHouse process is SIGKILLed (the writers retry; the engine restarts);
* ``ingest`` / ``aggregator`` / ``writers``: that service is stopped (SIGTERM) and started again; these reset
  the service's memory, so they are not in the default list (a leak would hide behind the restarts).

Every ``--sample`` seconds it reads the resident memory (``VmRSS``) of every process (the exchange, ingest, the
aggregator, the writers, the writers' embedded engine, the gateway) and the services' ``/metrics.json``; every
``--print-every`` seconds it prints a row: RSS per process, the aggregator's and the writers' lag (records not
yet read), trades sent/published/applied, and DATA_LOSS so far (the services' counters). At the end the run
drains and stops as ``klines run`` does, prints its summary, counts ``DATA_LOSS`` lines in every log, and
prints each process's RSS slope in MB/hour: a least-squares line through its samples after ``--warmup``
seconds, or, for a process the faults restarted three times or more (the writers' engine under ``engine``),
through the peak of each incarnation that ended (a line through its last incarnation would only measure its
warm-up). The exit status is non-zero when
anything was lost, the run's summary is not "nothing lost", or a slope exceeds ``--max-slope`` MB/hour.
Not part of CI (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "tests", REPO / "tests" / "e2e"):
    sys.path.insert(0, str(path))

from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402
from harness import FaultPipeline, isolated_env  # noqa: E402
from pipeline_runs import play_to_the_end  # noqa: E402
from ports import free_port  # noqa: E402

from services.runner import RunOptions  # noqa: E402
from services.shared.settings import load_settings  # noqa: E402

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "DOGEUSDT", "TRXUSDT")
INTERVALS = "1m,5m,15m,1h,4h,1d"
START = "2026-01-01T00:00:00Z"
#: Samples of a process started again are fitted from this long after its start.
RESTART_SETTLE_S = 60.0


# ------------------------------------------------------------------------------------------------ faults


def _drop(p: FaultPipeline) -> None:
    p.exchange_fault("drop_connections")


def _shutdown(p: FaultPipeline) -> None:
    p.exchange_fault("server_shutdown", {"close_after_s": 1.0})


def _stall(p: FaultPipeline) -> None:
    p.exchange_fault("stall", {"seconds": 5.0})


def _rate_limited_backfill(p: FaultPipeline) -> None:
    p.exchange_fault("rate_limit", {"weight_limit": 4, "window_s": 3.0})
    p.exchange_fault("drop_connections")
    time.sleep(8)
    p.exchange_fault("rate_limit", {"weight_limit": None})


def _engine(p: FaultPipeline) -> None:
    for pid in p.engine_pids():
        os.kill(pid, signal.SIGKILL)


def _restart(name: str) -> Callable[[FaultPipeline], None]:
    def action(p: FaultPipeline) -> None:
        p.restart(name, hard=False)

    return action


FAULTS: dict[str, Callable[[FaultPipeline], None]] = {
    "drop": _drop,
    "shutdown": _shutdown,
    "stall": _stall,
    "429": _rate_limited_backfill,
    "engine": _engine,
    "ingest": _restart("ingest"),
    "aggregator": _restart("aggregator"),
    "writers": _restart("writers"),
}


# ------------------------------------------------------------------------------------------------ sampling


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Sample:
    t: float
    rss: dict[str, tuple[int, float]]  # process -> (pid, MB)
    figures: dict[str, int | None]


@dataclass
class Soak:
    """The samples of one run and the faults injected, with their times."""

    samples: list[Sample] = field(default_factory=list)
    faults: list[tuple[float, str, str]] = field(default_factory=list)  # (t, name, outcome)


def _num(metrics: dict[str, Any] | None, key: str) -> int | None:
    value = (metrics or {}).get(key)
    return int(value) if isinstance(value, int | float) else None


class SoakPipeline(FaultPipeline):
    """The pipeline, watched for ``duration_s`` with a fault every ``fault_every_s`` and a sample every
    ``sample_s``; then it drains and stops as ``klines run`` does (the caller's part)."""

    def __init__(self, *args: Any, soak: Soak, args_: argparse.Namespace, **kwargs: Any) -> None:
        super().__init__(*args, steps=[], **kwargs)
        self.soak = soak
        self.args = args_
        self.started_at = 0.0

    def processes(self) -> dict[str, int]:
        found: dict[str, int] = {}
        if self.replay is not None and self.replay.alive and self.replay.proc is not None:
            found["exchange"] = self.replay.proc.pid
        for service in self.services:
            if service.alive and service.proc is not None:
                found[service.name] = service.proc.pid
        if "writers" in found:
            for pid in self.engine_pids():
                found["writers-engine"] = pid
        return found

    def sample(self) -> Sample:
        rss = {name: (pid, mb) for name, pid in self.processes().items() if (mb := rss_mb(pid)) is not None}
        ingest, aggregator, writers = (self._read(n) for n in ("ingest", "aggregator", "writers"))
        losses = [_num(aggregator, "data_loss"), _num(ingest, "data_loss_events"), _num(writers, "data_loss")]
        figures = {
            "sent": self._sent(self._replay_status()),
            "published": _num(ingest, "trades_published"),
            "applied": _num(aggregator, "trades_applied"),
            "aggregator_lag": _num(aggregator, "lag"),
            "writers_lag": _num(writers, "lag"),
            "data_loss": sum(x or 0 for x in losses),
        }
        sample = Sample(time.monotonic() - self.started_at, rss, figures)
        self.soak.samples.append(sample)
        return sample

    def watch(self, stop_requested: Any) -> str:
        args = self.args
        self.started_at = time.monotonic()
        end = self.started_at + args.minutes * 60
        names = [name for name in args.faults.split(",") if name]
        next_fault = self.started_at + args.fault_every
        next_sample = next_print = self.started_at
        fault_thread: threading.Thread | None = None
        self.say(f"soak: {args.minutes:g} min, a fault every {args.fault_every:g} s ({', '.join(names) or 'none'})")
        while time.monotonic() < end:
            if stop_requested():
                return "Ctrl-C"
            for service in self.services:
                if not service.alive and not (fault_thread is not None and fault_thread.is_alive()):
                    self.drain_problems.append(f"{service.name} exited unexpectedly")
                    return f"{service.name} exited unexpectedly ({service.log_path})"
            now = time.monotonic()
            if names and now >= next_fault and (fault_thread is None or not fault_thread.is_alive()):
                name = names[len(self.soak.faults) % len(names)]
                fault_thread = threading.Thread(target=self._fault, args=(name,), daemon=True)
                fault_thread.start()
                next_fault = now + args.fault_every
            if now >= next_sample:
                sample = self.sample()
                next_sample = now + args.sample
                if now >= next_print:
                    self.say(row(sample))
                    next_print = now + args.print_every
            time.sleep(0.2)
        if fault_thread is not None:
            fault_thread.join(60)
        return f"soak of {args.minutes:g} min done"

    def _fault(self, name: str) -> None:
        t = time.monotonic() - self.started_at
        try:
            FAULTS[name](self)
            outcome = "ok"
        except Exception as exc:  # reported in the table; the run goes on
            outcome = f"failed: {exc!r}"
        self.soak.faults.append((t, name, outcome))
        self.say(f"soak: fault {name} at {t:.0f} s: {outcome}")


COLUMNS = ("exchange", "ingest", "aggregator", "writers", "writers-engine", "gateway")


def row(sample: Sample) -> str:
    f = sample.figures
    rss = " ".join(f"{name}={sample.rss[name][1]:.0f}" if name in sample.rss else f"{name}=?" for name in COLUMNS)
    return (
        f"soak t={sample.t:5.0f}s RSS MB: {rss} | lag: aggregator {f['aggregator_lag']} writers {f['writers_lag']} "
        f"| trades sent {f['sent']} published {f['published']} applied {f['applied']} | DATA_LOSS {f['data_loss']}"
    )


# ------------------------------------------------------------------------------------------------ slopes


def slope_mb_per_hour(points: list[tuple[float, float]], min_points: int = 10) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per hour; None with fewer than ``min_points``."""
    if len(points) < min_points:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (m - mean_m) for t, m in points)
    return cov / var * 3600


def slopes(soak: Soak, warmup_s: float) -> dict[str, tuple[float | None, float, float, int, int, str]]:
    """Per process: (slope MB/h, first and last fitted MB, points, starts, basis).

    A process that ran all along is fitted through its samples after ``warmup_s`` (basis ``samples``). A process
    the faults restarted (the writers' engine, killed by ``engine``) is in its warm-up again after every start,
    so a line through its last incarnation measures the warm-up, not a trend: it is judged by the peak of each
    incarnation that ended, against the time it started (basis ``peaks``: a leak that survives restarts, such as
    state the process reloads, makes each incarnation peak higher). With fewer than three ended incarnations it
    falls back to its last incarnation, fitted only when that ran at least ``warmup_s`` after its settle time.
    """
    out: dict[str, tuple[float | None, float, float, int, int, str]] = {}
    names = sorted({name for s in soak.samples for name in s.rss})
    for name in names:
        series = [(s.t, *s.rss[name]) for s in soak.samples if name in s.rss]
        pids = list(dict.fromkeys(pid for _, pid, _ in series))
        lives = [[(t, mb) for t, pid, mb in series if pid == one] for one in pids]
        ended = lives[:-1]
        if len(ended) >= 3:
            peaks = [(life[0][0], max(mb for _, mb in life)) for life in ended]
            slope = slope_mb_per_hour(peaks, min_points=3)
            out[name] = (slope, peaks[0][1], peaks[-1][1], len(peaks), len(pids), "peaks")
            continue
        last = lives[-1]
        since = warmup_s if len(pids) == 1 else last[0][0] + RESTART_SETTLE_S
        fitted = [(t, mb) for t, mb in last if t >= max(since, warmup_s)]
        long_enough = len(pids) == 1 or (fitted and fitted[-1][0] - fitted[0][0] >= warmup_s)
        first_mb, last_mb = (fitted[0][1], fitted[-1][1]) if fitted else (0.0, 0.0)
        slope = slope_mb_per_hour(fitted) if long_enough else None
        out[name] = (slope, first_mb, last_mb, len(fitted), len(pids), "samples")
    return out


# ------------------------------------------------------------------------------------------------ main


async def delete_topics(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        doomed = [t for t in await admin.list_topics() if name in t]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the soak runs (default 30)")
    parser.add_argument("--symbols", type=int, default=3, help=f"1..{len(SYMBOLS)} symbols (default 3)")
    parser.add_argument("--speed", type=float, default=10.0, help="market time per wall time (default 10)")
    parser.add_argument("--intervals", default=INTERVALS)
    parser.add_argument("--fault-every", type=float, default=120.0, help="seconds between faults (default 120)")
    parser.add_argument("--faults", default="drop,shutdown,stall,429,engine", help=f"in turn, of {', '.join(FAULTS)}")
    parser.add_argument("--warmup", type=float, default=300.0, help="seconds not fitted at the start (default 300)")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--print-every", type=float, default=60.0, help="seconds between printed rows")
    parser.add_argument("--max-slope", type=float, default=25.0, help="MB/hour above which a process fails")
    parser.add_argument("--keep", action="store_true", help="keep the state directory and topics")
    args = parser.parse_args(argv)
    unknown = [name for name in args.faults.split(",") if name and name not in FAULTS]
    if unknown or not 1 <= args.symbols <= len(SYMBOLS):
        parser.error(f"unknown faults {unknown}" if unknown else f"--symbols must be 1..{len(SYMBOLS)}")

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    runs = Path("/tmp") / "klines-bench"
    runs.mkdir(parents=True, exist_ok=True)
    staging = runs / f"soak-{uuid.uuid4().hex[:8]}"
    env = isolated_env(bootstrap, staging)  # own topics, client id (consumer groups), chDB directory, ports
    name = env["KLINES_KAFKA__CLIENT_ID"]
    state = staging
    os.environ.update(env)  # the pipeline hands this process's environment on
    market_minutes = args.minutes * args.speed + 10
    options = RunOptions(
        offline=True,
        speed=args.speed,
        duration=0,
        market_duration=f"{int(market_minutes)}m",
        start=START,
        seed=1,
        symbols=list(SYMBOLS[: args.symbols]),
        intervals=args.intervals.split(","),
        replay_port=free_port(),
        fresh=False,
        drain_stall_s=120,
    )
    soak = Soak()
    print(
        f"soak {name}: {args.symbols} symbols at {args.speed:g}x for {args.minutes:g} min, state {state}, "
        f"broker {bootstrap}",
        flush=True,
    )
    pipeline = SoakPipeline(load_settings(None), options, sys.stdout, soak=soak, args_=args)
    summary = play_to_the_end(pipeline)
    logged = sum(
        log.read_text(errors="replace").count('"log_type": "DATA_LOSS"') for log in (state / "logs").glob("*.log")
    )

    print("\nFaults:")
    for t, fault, outcome in soak.faults:
        print(f"  {t:6.0f} s  {fault:<10} {outcome}")
    lags = [s.figures["aggregator_lag"] for s in soak.samples if s.figures["aggregator_lag"] is not None]
    wlags = [s.figures["writers_lag"] for s in soak.samples if s.figures["writers_lag"] is not None]
    print(
        f"\nLag (records not yet read) over {len(soak.samples)} samples: aggregator max {max(lags, default=None)}, "
        f"mean {sum(lags) / len(lags) if lags else float('nan'):.1f}; writers max {max(wlags, default=None)}, "
        f"mean {sum(wlags) / len(wlags) if wlags else float('nan'):.1f}"
    )
    counted = max((s.figures["data_loss"] or 0 for s in soak.samples), default=0)
    print(f"DATA_LOSS: {summary.data_loss} (summary), {counted} (counters during the run), {logged} (log lines)")
    print(f"\nRSS slope after {args.warmup:g} s warm-up (least squares, MB/hour; limit {args.max_slope:g}):")
    print(f"  {'process':<16} {'slope MB/h':>11} {'first MB':>9} {'last MB':>8} {'points':>7} {'starts':>7}  basis")
    growing = []
    for process, (slope, first, last, points, starts, basis) in slopes(soak, args.warmup).items():
        text = "n/a" if slope is None else f"{slope:+.1f}"
        print(f"  {process:<16} {text:>11} {first:9.1f} {last:8.1f} {points:7d} {starts:7d}  {basis}")
        if slope is not None and slope > args.max_slope:
            growing.append(process)
    print(
        "  basis: samples = a line through the samples after the warm-up; peaks = a line through the peak of each\n"
        "  incarnation that ended, for a process the faults restarted (each start is a new warm-up)"
    )
    (state / "soak.json").write_text(
        json.dumps({"samples": [vars(s) for s in soak.samples], "faults": soak.faults}, default=str)
    )
    ok = summary.exit_code == 0 and logged == 0 and counted == 0 and not growing
    print(f"\nresult: {'OK' if ok else 'FAILED'}" + (f" (memory grows: {', '.join(growing)})" if growing else ""))
    if not args.keep:
        asyncio.run(delete_topics(bootstrap, name))
        shutil.rmtree(state, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
