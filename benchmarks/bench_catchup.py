"""Catch-up end to end on this machine, and the aggregator's recovery after ten minutes down; zero loss checked.

Run: ``KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python benchmarks/bench_catchup.py [--symbols 10]
[--market-duration 2h] [--recovery-symbols 200] [--recovery-speed 10] [--down 10m] [--signal term|kill|both]
[--only e2e|recovery] [--keep]`` (``KAFKA_BOOTSTRAP`` defaults to the local broker). Prints two tables.

Both parts run ``klines run``'s own pipeline (:class:`~services.runner.LocalPipeline`, in this process) on a
generated market from the replay exchange: every service is a process of its own on this machine (exchange,
ingest, aggregator, writers with embedded chDB, gateway; the broker too), none pinned. Each run is isolated:
its own state directory under ``/tmp``, chDB directory, ports, topic names and client id; its topics are
deleted at the end (``--keep`` keeps them and the state directory). A thread reads every service's ``/metrics``
(and the exchange's ``/_control/status``) every quarter second, so rates are shown per 5 s window, not only
on average.

1. **Catch-up end to end** (``--speed 0``: the exchange sends as fast as it is read): ``--symbols`` symbols
   (Binance majors first, then generated names) over ``--market-duration`` of market, intervals ``--intervals``.
   The rate is the trades ingest published divided by the time from the first trade published to the last
   finalized kline stored (the finalized writer's ``rows_inserted`` reaching the aggregator's final
   ``klines_finalized``). Per 5 s window: each stage's rate, the aggregator's ``lag`` and
   ``unconfirmed_finalized``, and how busy the machine's CPUs were. Then: the aggregator's ``longest_apply_s``,
   ``flow_pauses``/``flow_paused_s``, DATA_LOSS, finalized == stored (``SELECT count() ... FINAL``) and the
   run's verdict (its summary must say "nothing lost"). Same-run comparison: a bare aiokafka consumer reads the
   whole trades topic after the run (services stopped): what the client alone does with these records.
2. **Aggregator recovery**: ``--recovery-symbols`` symbols at ``--recovery-speed`` (market time per wall time);
   after ``--warmup`` of market the aggregator is stopped (SIGTERM, or SIGKILL with ``--signal kill``) for
   ``--down`` of market time while ingest keeps publishing, then started again. Measured from its restart:
   until ``/readyz`` says ready; until it has read every trades record that existed at the restart (the
   backlog); until its ``lag`` is 0 with every finalized kline confirmed (``unconfirmed_finalized`` 0). The
   catch-up rate is the trades it applied from ready to caught up over that time; "klines closed" is what it
   finalized in that time (a quiet second or minute of each symbol closes when the symbol's next trade
   arrives, so the backlog closes them at once; flow control holds the input while they drain). The run then
   goes on to the end of the tape and drains; it must report zero DATA_LOSS and "nothing lost".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_runs import (
    WINDOW_S,
    Run,
    Sample,
    Sampler,
    bare_consumer,
    print_cpu_seconds,
    print_verdict,
    print_windows,
    read_metrics,
    replay_options,
    symbols,
    windows,
)
from pipeline_runs import num as _num

from services.replay.config import parse_duration_ms, parse_utc_ms
from services.runner import LocalPipeline, RunSummary
from services.shared.kafka import end_offsets

TARGET_TPS = 50_000
#: How long the recovery waits for the aggregator to catch up before it reports a stall.
CATCH_UP_TIMEOUT_S = 600.0


def print_catchup_windows(rows: list[list[Any]]) -> None:
    heads = ("exchange/s", "published/s", "applied/s", "finalized/s", "stored/s")
    print_windows(rows, heads, (("lag", 8, "{:,}".format), ("unconf.", 9, "{:,}".format)))
    print("  (rates per second of wall time in each window; lag, unconfirmed: the aggregator's at its end (-: no")
    print("  answer); CPU: share of all CPUs busy, every process of the machine)")


# ------------------------------------------------------------------------------------------------ 1. end to end


def end_to_end(args: argparse.Namespace) -> bool:
    names = symbols(args.symbols)
    options = replay_options(
        names, speed=0.0, market_duration=args.market_duration, intervals=args.intervals.split(",")
    )
    run = Run.create("e2e", options)
    print(
        f"\n1. Catch-up end to end at --speed 0: {len(names)} symbols x {args.market_duration} generated market, "
        f"intervals {args.intervals}\n   (run {run.name}; pipeline output and logs in {run.state})",
        flush=True,
    )
    with (run.state / "run.out").open("w") as out:
        pipeline = LocalPipeline(run.settings, options, out)
        sampler = Sampler(pipeline)
        summary = run.play(pipeline, sampler)
        aggregator = pipeline.metrics.get("aggregator", {})
    samples = sampler.samples
    try:
        limit = asyncio.run(bare_consumer(run.settings))
        return report_end_to_end(run, summary, aggregator, samples, limit)
    finally:
        asyncio.run(run.cleanup(args.keep))


def report_end_to_end(
    run: Run, summary: RunSummary, aggregator: dict[str, Any], samples: list[Sample], limit: tuple[int, float]
) -> bool:
    published = summary.trades_published or 0
    finalized = summary.klines_finalized or 0
    first = next((s.t for s in samples if (s.published or 0) > 0), None)
    last_published = next((s.t for s in samples if (s.published or 0) >= published), None)
    applied_first = next((s.t for s in samples if (s.applied or 0) > 0), None)
    applied_last = next((s.t for s in samples if (s.applied or 0) >= (summary.trades_applied or 0)), None)
    stored_last = next((s.t for s in samples if (s.stored or 0) >= finalized), None)
    if first is None or stored_last is None or last_published is None:
        print(f"  no rate: the samples never saw the first trade published or the last kline stored ({run.state})")
        return False
    print()
    print_catchup_windows(windows(samples, first, stored_last))

    def rate_row(label: str, count: int, start: float | None, end: float | None, extra: str = "") -> None:
        if start is None or end is None or end <= start:
            print(f"  {label:<58} {count:>10,} {'-':>8} {'-':>10}")
            return
        print(f"  {label:<58} {count:>10,} {end - start:>8.1f} {count / (end - start):>10,.0f} {extra}".rstrip())

    e2e = published / (stored_last - first)
    records, seconds = limit
    print()
    print(f"  {'stage':<58} {'trades':>10} {'seconds':>8} {'trades/s':>10}")
    print("  " + "-" * 90)
    rate_row("exchange -> ingest -> trades topic (first to last published)", published, first, last_published)
    rate_row("aggregator (first to last trade applied)", summary.trades_applied or 0, applied_first, applied_last)
    verdict = "meets" if e2e >= TARGET_TPS else "below"
    rate_row(
        "end to end: first trade published -> last finalized stored",
        published,
        first,
        stored_last,
        f"({verdict} the {TARGET_TPS / 1000:.0f}k target)",
    )
    per_record = published / records if records else 0.0
    print(
        f"  {'limit: bare aiokafka consumer, trades topic after the run':<58} {published:>10,} {seconds:>8.1f} "
        f"{records * per_record / seconds:>10,.0f} ({records:,} records, {records / seconds:,.0f} records/s, "
        f"{per_record:.0f} trades per record)"
    )
    span = stored_last - first
    print_cpu_seconds(samples, published)
    lags = [s.lag for s in samples if s.lag is not None and first <= s.t <= stored_last]
    unconfirmed = [s.unconfirmed for s in samples if s.unconfirmed is not None and first <= s.t <= stored_last]
    missing = sum(1 for s in samples if first <= s.t <= stored_last and s.applied is None)
    window = [s for s in samples if first <= s.t <= stored_last]
    print(
        f"  aggregator: longest batch apply {float(aggregator.get('longest_apply_s') or 0):.3f} s, input paused "
        f"{summary.flow_pauses} times for {summary.flow_paused_s:.1f} s, max lag {max(lags, default=0):,} records, "
        f"max unconfirmed {max(unconfirmed, default=0):,}, /metrics unanswered in {missing} of {len(window)} "
        f"samples ({span:.0f} s)"
    )
    return print_verdict(run, summary, finalized)


# ------------------------------------------------------------------------------------------------ 2. recovery


@dataclass
class Recovery:
    """What one stop-and-restart of the aggregator measured (seconds from its restart)."""

    signal: str
    exit_code: int | None = None
    down_wall_s: float = 0.0
    published_while_down: int = 0
    backlog_records: int = 0
    reread_records: int | None = None  # records it had read before the stop and read again from its checkpoint
    ready_s: float | None = None
    backlog_read_s: float | None = None
    caught_up_s: float | None = None
    applied: int = 0  # by the new incarnation, from its start until caught up
    klines_closed: int = 0
    max_unconfirmed: int = 0
    max_in_flight: int = 0
    flow_pauses: int = 0
    flow_paused_s: float = 0.0
    longest_apply_s: float = 0.0
    restarted_at: float = 0.0  # time.monotonic() of the restart
    aggregator_cpu_s: float | None = None  # its CPU seconds from ready to caught up
    tape_ended_s: float | None = None  # the exchange sent its last trade (ingest stops publishing)
    error: str | None = None
    timeline: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    @property
    def catch_up_tps(self) -> float | None:
        if self.caught_up_s is None or self.ready_s is None or self.caught_up_s <= self.ready_s:
            return None
        return self.applied / (self.caught_up_s - self.ready_s)


class RecoveryPipeline(LocalPipeline):
    """``klines run``'s pipeline whose aggregator is stopped after a warm-up, kept down for ``down_ms`` of
    market time while ingest keeps publishing, then started again and timed until it has caught up."""

    def __init__(self, *args: Any, kill: bool, warmup_ms: int, down_ms: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kill, self.warmup_ms, self.down_ms = kill, warmup_ms, down_ms
        self.recovery = Recovery("SIGKILL" if kill else "SIGTERM")
        self.start_ms = parse_utc_ms(self.options.start)

    def market_ms(self) -> int:
        return int((self._replay_status() or {}).get("market_time_ms") or 0)

    def wait_market(self, until_ms: int, what: str) -> None:
        deadline = time.monotonic() + 900
        while self.market_ms() < until_ms:
            if (self._replay_status() or {}).get("exhausted"):
                raise RuntimeError(f"the tape ended before {what}: make --market-duration longer")
            if time.monotonic() > deadline:
                raise RuntimeError(f"market time did not reach {what} within 900 s")
            time.sleep(0.1)

    def watch(self, stop_requested: Callable[[], bool]) -> str:
        r = self.recovery
        self.wait_market(self.start_ms + self.warmup_ms, "the end of the warm-up")
        aggregator = self._service("aggregator")
        assert aggregator is not None and aggregator.proc is not None
        published_at_stop = _num(read_metrics(self._service("ingest")), "trades_published") or 0
        read_at_stop = (read_metrics(aggregator) or {}).get("read_offsets") or {}
        stopped_market = self.market_ms()
        self.say(f"bench: {r.signal} to the aggregator at market {stopped_market}")
        down_from = time.monotonic()
        if self.kill:
            aggregator.proc.kill()
            r.exit_code = aggregator.proc.wait()
            if aggregator.log_file is not None:
                aggregator.log_file.close()
                aggregator.log_file = None
        else:
            r.exit_code = aggregator.stop(self.settings.service.shutdown_grace_s + 5)
        self.wait_market(stopped_market + self.down_ms, "the end of the down time")
        ends = asyncio.run(end_offsets(self.settings.kafka, self.settings.kafka.topics.trades))
        r.backlog_records = sum(ends.values()) - sum(int(v) for v in read_at_stop.values())
        published = _num(read_metrics(self._service("ingest")), "trades_published") or 0
        r.published_while_down = published - published_at_stop
        restarted = r.restarted_at = time.monotonic()
        r.down_wall_s = restarted - down_from
        self.say(f"bench: starting the aggregator again ({r.published_while_down} trades published while down)")
        aggregator.start(self.env)
        self.time_recovery(restarted, ends)
        restored = [
            rec.get("checkpoint_offsets") or {}
            for rec in aggregator.log_records()
            if rec.get("message") == "partitions restored from the checkpoint topic"
        ]
        if len(restored) >= 2:  # this incarnation's restore is the last one of the run
            start = {int(p): int(o or 0) for p, o in restored[-1].items()}
            r.reread_records = sum(max(0, int(o) - start.get(int(p), 0)) for p, o in read_at_stop.items())
        self.say(f"bench: aggregator caught up in {r.caught_up_s} s after its restart")
        return super().watch(stop_requested)

    def time_recovery(self, restarted: float, ends: dict[int, int]) -> None:
        """Poll the restarted aggregator closely until it is caught up (or :data:`CATCH_UP_TIMEOUT_S`)."""
        r = self.recovery
        aggregator = self._service("aggregator")
        assert aggregator is not None
        status_at = 0.0
        while time.monotonic() - restarted < CATCH_UP_TIMEOUT_S:
            if r.tape_ended_s is None and time.monotonic() - status_at >= 1.0:
                status_at = time.monotonic()
                if (self._replay_status() or {}).get("exhausted"):
                    r.tape_ended_s = status_at - restarted
            if not aggregator.alive:
                raise RuntimeError(f"the aggregator exited during its recovery:\n{aggregator.tail(15)}")
            now = time.monotonic() - restarted
            if r.ready_s is None:
                if aggregator.ready():
                    r.ready_s = now
                time.sleep(0.05)
                continue
            m = read_metrics(aggregator)
            if m is None:
                time.sleep(0.1)
                continue
            r.timeline.append((now, m))
            r.max_unconfirmed = max(r.max_unconfirmed, _num(m, "unconfirmed_finalized") or 0)
            r.max_in_flight = max(r.max_in_flight, _num(m, "in_flight") or 0)
            read = {int(p): int(o) for p, o in (m.get("read_offsets") or {}).items()}
            if r.backlog_read_s is None and read and all(read.get(p, -1) >= end for p, end in ends.items()):
                r.backlog_read_s = now
            if r.backlog_read_s is not None and m.get("lag") == 0 and m.get("unconfirmed_finalized") == 0:
                r.caught_up_s = now
                r.applied = _num(m, "trades_applied") or 0
                r.klines_closed = _num(m, "klines_finalized") or 0
                r.flow_pauses = _num(m, "flow_pauses") or 0
                r.flow_paused_s = float(m.get("flow_paused_s") or 0.0)
                r.longest_apply_s = float(m.get("longest_apply_s") or 0.0)
                return
            time.sleep(0.2)
        self.say(f"bench: the aggregator did not catch up within {CATCH_UP_TIMEOUT_S:.0f} s of its restart")


def recovery(args: argparse.Namespace, kill: bool) -> tuple[Recovery, RunSummary, int, Run]:
    names = symbols(args.recovery_symbols)
    warmup_ms, down_ms = parse_duration_ms(args.warmup), parse_duration_ms(args.down)
    options = replay_options(
        names,
        speed=args.recovery_speed,
        market_duration=args.recovery_market_duration,
        intervals=args.intervals.split(","),
    )
    run = Run.create("recovery", options)
    how = "SIGKILL" if kill else "SIGTERM"
    print(
        f"\n2. Aggregator recovery ({how}): {len(names)} symbols, speed x{args.recovery_speed:g}, "
        f"{args.recovery_market_duration} of market, stopped after {args.warmup} for {args.down} of market time\n"
        f"   (run {run.name}; pipeline output and logs in {run.state})",
        flush=True,
    )
    try:
        with (run.state / "run.out").open("w") as out:
            pipeline = RecoveryPipeline(run.settings, options, out, kill=kill, warmup_ms=warmup_ms, down_ms=down_ms)
            sampler = Sampler(pipeline)
            try:
                summary = run.play(pipeline, sampler)
                pipeline.recovery.aggregator_cpu_s = aggregator_cpu(sampler.samples, pipeline.recovery)
            except RuntimeError as exc:  # a service or the exchange did not start, the tape was too short ...
                pipeline.recovery.error = str(exc).splitlines()[0]
                summary = pipeline.summary()
                summary.drain_problems.append(pipeline.recovery.error)
        losses = max(summary.data_loss, run.logged_losses())
        return pipeline.recovery, summary, losses, run
    finally:
        asyncio.run(run.cleanup(args.keep))


def aggregator_cpu(samples: list[Sample], r: Recovery) -> float | None:
    """The restarted aggregator's CPU seconds from ready to caught up, from the sampler's readings."""
    if r.ready_s is None or r.caught_up_s is None:
        return None
    ready, caught = r.restarted_at + r.ready_s, r.restarted_at + r.caught_up_s
    readings = [(s.t, s.process_cpu["aggregator"]) for s in samples if "aggregator" in s.process_cpu]
    before = [cpu for t, cpu in readings if t <= ready]
    after = [cpu for t, cpu in readings if t >= caught]
    return after[0] - before[-1] if before and after and after[0] >= before[-1] else None


def print_recovery(results: list[tuple[Recovery, RunSummary, int, Run]]) -> bool:
    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    head = f"  {'stop':<8}{'exit':>5}{'down s':>8}{'backlog':>10}{'records':>9}{'re-read':>9}{'ready s':>9}"
    head += f"{'backlog s':>11}"
    head += f"{'caught up s':>13}{'trades/s':>10}{'klines':>9}{'unconf.':>9}{'paused':>13}{'apply s':>9}"
    print("\n" + head + f"{'DATA_LOSS':>11}  run")
    print("  " + "-" * (len(head) + 16))
    ok = True
    for r, summary, losses, _run in results:
        tps = r.catch_up_tps
        verdict = "nothing lost" if summary.exit_code == 0 else "FAILED"
        reread = "?" if r.reread_records is None else f"{r.reread_records:,}"
        print(
            f"  {r.signal:<8}{'-' if r.exit_code is None else r.exit_code:>5}{r.down_wall_s:>8.1f}"
            f"{r.published_while_down:>10,}{r.backlog_records:>9,}{reread:>9}"
            f"{s(r.ready_s):>9}{s(r.backlog_read_s):>11}"
            f"{s(r.caught_up_s):>13}{'-' if tps is None else f'{tps:,.0f}':>10}{r.klines_closed:>9,}"
            f"{r.max_unconfirmed:>9,}{f'{r.flow_pauses}x {r.flow_paused_s:.1f}s':>13}{r.longest_apply_s:>9.3f}"
            f"{losses:>11}  {verdict}"
        )
        if r.aggregator_cpu_s and r.caught_up_s is not None and r.ready_s is not None:
            print(
                f"    the aggregator used {r.aggregator_cpu_s:.1f} CPU-s from ready to caught up "
                f"({r.aggregator_cpu_s / max(1e-9, r.caught_up_s - r.ready_s):.0%} of a core): "
                f"{r.applied / r.aggregator_cpu_s:,.0f} trades per CPU-second"
            )
        if r.tape_ended_s is not None:
            print(f"    the tape ended {r.tape_ended_s:.1f} s after the restart: ingest published nothing after that")
        if summary.exit_code != 0:
            print(f"    problems: {'; '.join(summary.problems())}")
        ok = ok and summary.exit_code == 0 and losses == 0 and r.caught_up_s is not None
    print(
        "  exit: the stopped aggregator's exit code (SIGKILL: -9); down s: wall time it was down; backlog: trades\n"
        "  ingest published meanwhile, records: trades records past what it had read; re-read: records it had read\n"
        "  before the stop and read again from its checkpoint; ready / backlog / caught up:\n"
        "  seconds from its restart until /readyz, until it read every record that existed at the restart, until\n"
        "  lag 0 with every finalized kline confirmed; trades/s: applied from ready to caught up (new trades\n"
        "  included); klines: finalized in that time; unconf.: most finalized klines awaiting the broker's ack;\n"
        "  paused: flow control holding the input; apply s: its longest batch apply; run: the run's summary"
    )
    for r, _summary, _losses, _run in results:
        if r.timeline:
            print(f"  {r.signal} recovery, every ~{WINDOW_S:.0f} s from ready to caught up:")
            print_recovery_timeline(r)
    return ok


def print_recovery_timeline(r: Recovery) -> None:
    print(f"    {'s':>6}{'applied':>11}{'trades/s':>10}{'finalized':>11}{'lag':>9}{'unconf.':>9}{'in flight':>11}")
    previous: tuple[float, int] | None = None
    next_at = 0.0
    for index, (t, m) in enumerate(r.timeline):
        if t < next_at and index != len(r.timeline) - 1:
            continue
        next_at = t + WINDOW_S
        applied = _num(m, "trades_applied") or 0
        rate = "" if previous is None else f"{(applied - previous[1]) / max(1e-9, t - previous[0]):,.0f}"
        previous = (t, applied)
        lag = m.get("lag")
        print(
            f"    {t:>6.1f}{applied:>11,}{rate:>10}{_num(m, 'klines_finalized') or 0:>11,}"
            f"{'-' if lag is None else lag:>9}{_num(m, 'unconfirmed_finalized') or 0:>9,}"
            f"{_num(m, 'in_flight') or 0:>11,}"
        )


# ------------------------------------------------------------------------------------------------ main


def main(args: argparse.Namespace) -> int:
    print(
        f"bench_catchup: {os.cpu_count()} CPUs (every service and the broker share them), broker "
        f"{os.environ.get('KAFKA_BOOTSTRAP', '127.0.0.1:9092')}, intervals {args.intervals}"
    )
    ok = True
    if args.only in (None, "e2e"):
        ok = end_to_end(args) and ok
    if args.only in (None, "recovery"):
        kills = {"term": [False], "kill": [True], "both": [False, True]}[args.signal]
        ok = print_recovery([recovery(args, kill) for kill in kills]) and ok
    if not ok:
        print("\nbench_catchup: a check failed (loss, finalized != stored, a failed run or no catch-up): see above")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--symbols", type=int, default=10, help="symbols of the end-to-end run")
    parser.add_argument("--market-duration", default="2h", help="market length of the end-to-end run")
    parser.add_argument("--intervals", default="1s,1m,5m,1h")
    parser.add_argument("--recovery-symbols", type=int, default=200)
    parser.add_argument("--recovery-speed", type=float, default=10.0, help="market time per wall time")
    # The replay exchange generates the whole market before it answers (200 symbols x 14 minutes, about a million
    # trades, takes 20-30 s on a busy 2-core machine; the runner waits as long as it lives, up to 10 minutes), so
    # the tape is kept short: it ends about 18 s after the restart.
    parser.add_argument("--recovery-market-duration", default="14m")
    parser.add_argument("--warmup", default="1m", help="market time before the aggregator is stopped")
    parser.add_argument("--down", default="10m", help="market time the aggregator stays down")
    parser.add_argument("--signal", choices=["term", "kill", "both"], default="term")
    parser.add_argument("--only", choices=["e2e", "recovery"], help="run one of the two parts")
    parser.add_argument("--keep", action="store_true", help="keep the runs' topics and state directories")
    sys.exit(main(parser.parse_args()))
