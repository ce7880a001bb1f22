"""The pipeline-equals-replay harness: play a tape through the whole pipeline, fold it with ``klines replay``,
compare ``klines_finalized FINAL`` of the two field by field, and check the run lost nothing.

Used by ``test_pipeline_equals_replay.py`` and the fault tests; see that module for what each case proves.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ports import free_port

from services.replay.config import parse_utc_ms
from services.runner import LocalPipeline, Service
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


def trades_in(tape: Tape) -> int:
    """How many trades the tape's files hold (their CSV lines, a header left out)."""
    total = 0
    for spec in tape.files:
        with Path(spec.rpartition(":")[0]).open() as f:
            total += sum(1 for line in f if line[:1].isdigit())
    return total


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


def assert_no_loss(out: str, state: Path, *, dead_letters: int = 0) -> None:
    """The run's summary and every service log: zero DATA_LOSS, exactly ``dead_letters`` dead letters (zero
    unless a test injected bad records), nothing dropped."""
    expected = ("DATA_LOSS: 0", f"dead letters: {dead_letters}", "drain: complete", "result: OK, nothing lost")
    for line in expected:
        assert re.search(rf"^\s*{re.escape(line)}(?!\d)", out, re.M), f"{line!r} missing from:\n{out}"
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


def assert_same_klines(
    pipeline: dict[tuple[str, str, int], Row],
    expected: dict[tuple[str, str, int], Row],
    *,
    columns: tuple[str, ...] = COLUMNS,
) -> None:
    """Field by field (rows of ``columns``); on failure, the counts and the first differences, readable."""
    missing = sorted(expected.keys() - pipeline.keys())
    extra = sorted(pipeline.keys() - expected.keys())
    differing = sorted(key for key in expected.keys() & pipeline.keys() if expected[key] != pipeline[key])
    if missing or extra or differing:
        lines = [f"{len(missing)} missing, {len(extra)} extra, {len(differing)} differing of {len(expected)}"]
        lines += [f"missing {key}" for key in missing[:5]] + [f"extra {key}" for key in extra[:5]]
        for key in differing[:5]:
            fields = [
                f"{name}: pipeline {a!r} replay {b!r}"
                for name, a, b in zip(columns, pipeline[key], expected[key], strict=True)
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


def last_trade_times(tape: Tape) -> dict[str, int]:
    """Each symbol's last trade time (ms) in the tape's files (data.binance.vision layout: ``T`` is column 6)."""
    last: dict[str, int] = {}
    for spec in tape.files:
        path, _, symbol = spec.rpartition(":")
        with Path(path).open() as f:
            times = [int(line.split(",")[5]) for line in f if line[:1].isdigit()]
        last[symbol] = max(times)
    return last


def check_corrected(state: Path, tape: Tape, tmp: Path) -> dict[tuple[str, str, int], Row]:
    """The pipeline's stored klines equal ``klines replay``'s in every value, where a kline corrected after it
    was first finalized (a late trade: the wall clock closed it before its trades arrived) is stored as a higher
    ``version`` with ``source="repaired"``; the pipeline's rows.

    Only the klines that closed before each symbol's last trade are compared: after a tape ends, the wall clock
    goes on closing the last open klines and empty ones after them, which a replay of the files never does.
    """
    got = finalized(f"chdb://{state / 'chdb'}")
    replay(tape, f"chdb://{tmp / 'replay-chdb'}")
    expected = finalized(f"chdb://{tmp / 'replay-chdb'}")
    assert expected, "klines replay stored nothing: the tape is empty"
    last = last_trade_times(tape)
    close_time = COLUMNS.index("close_time")
    values = [k for k, name in enumerate(COLUMNS) if name not in ("version", "source")]

    def before_the_end(rows: dict[tuple[str, str, int], Row]) -> dict[tuple[str, str, int], Row]:
        return {key: row for key, row in rows.items() if row[close_time] < last[key[0]]}

    pipeline, replayed = before_the_end(got), before_the_end(expected)
    assert_same_klines(
        {key: tuple(row[k] for k in values) for key, row in pipeline.items()},
        {key: tuple(row[k] for k in values) for key, row in replayed.items()},
        columns=tuple(COLUMNS[k] for k in values),
    )
    version, source = COLUMNS.index("version"), COLUMNS.index("source")
    for key, row in pipeline.items():
        if row[version] > replayed[key][version]:
            assert row[source] == "repaired", (key, row)
        else:
            assert row[version:] == replayed[key][version:], (key, row, replayed[key])
    return got


def kinds(rows: dict[tuple[str, str, int], Row]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows.values():
        counts[row[-1]] = counts.get(row[-1], 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------ fault schedules


@dataclass(frozen=True)
class Step:
    """One fault of a schedule: once the exchange has sent ``after_sent`` trades, ``action(pipeline)`` runs."""

    after_sent: int
    label: str
    action: Callable[[FaultPipeline], None]


class FaultPipeline(LocalPipeline):
    """``klines run``'s pipeline with a fault schedule: each :class:`Step` runs, in order, once the exchange has
    sent its number of trades, then the run goes on as ``klines run`` does (watch until exhausted, drain, stop).
    The helpers kill and start the pipeline's own processes and call the replay exchange's fault API."""

    def __init__(self, *args: Any, steps: list[Step], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps = steps
        self.done: list[str] = []
        #: Processes a step started besides the pipeline's own (a second aggregator, a group member), by name;
        #: the run's watch does not require them alive, and :func:`run_faulted` stops what is left of them.
        self.extras: dict[str, Service] = {}

    def watch(self, stop_requested: Any) -> str:
        for step in self.steps:
            deadline = time.monotonic() + 120
            while (self._sent(self._replay_status()) or 0) < step.after_sent:
                status = self._replay_status() or {}
                assert not status.get("exhausted"), f"the tape ended before step {step.label!r}"
                assert time.monotonic() < deadline, f"the exchange sent too few trades for step {step.label!r}"
                time.sleep(0.05)
            self.say(f"test: {step.label} (exchange sent {self._sent(self._replay_status())} trades)")
            step.action(self)
            self.done.append(step.label)
        return super().watch(stop_requested)

    # -- the pipeline's processes

    def process(self, name: str) -> subprocess.Popen[bytes]:
        service = self._service(name)
        assert service is not None and service.proc is not None and service.alive, f"{name} is not running"
        return service.proc

    def kill(self, name: str, *, hard: bool) -> None:
        """SIGKILL ``name`` (``hard``), or SIGTERM it and require a clean exit (0) within the grace period."""
        service = self._service(name)
        assert service is not None
        if hard:
            self.process(name).kill()
            self.process_wait(name)
        else:
            code = service.stop(self.settings.service.shutdown_grace_s + 5)
            assert code == 0, f"{name} exited {code} on SIGTERM:\n{service.tail(20)}"

    def process_wait(self, name: str) -> None:
        service = self._service(name)
        assert service is not None and service.proc is not None
        service.proc.wait(30)
        if service.log_file is not None:
            service.log_file.close()
            service.log_file = None

    def start_again(self, name: str) -> None:
        service = self._service(name)
        assert service is not None and not service.alive
        service.start(self.env)
        self._wait_ready(service, timeout=90)

    def restart(self, name: str, *, hard: bool, down_s: float = 0.0) -> None:
        self.kill(name, hard=hard)
        time.sleep(down_s)
        self.start_again(name)

    def metrics_of(self, name: str) -> dict[str, Any]:
        return self._read(name) or {}

    # -- processes besides the pipeline's own

    def start_extra(
        self, name: str, argv: list[str], *, env: dict[str, str] | None = None, health_port: int | None = None
    ) -> Service:
        """Start ``argv`` with the pipeline's environment (plus ``env``), its log ``<state>/logs/<name>.log``
        (checked by :func:`assert_no_loss` like the others); with ``health_port``, wait for its ``/readyz``."""
        assert name not in self.extras or not self.extras[name].alive, f"{name} runs already"
        service = Service(name, argv, health_port, self.logs / f"{name}.log")
        service.start({**self.env, **(env or {})})
        self.extras[name] = service
        self._wait_ready(service, timeout=90)
        return service

    def start_second_aggregator(self, name: str = "aggregator-2") -> Service:
        """A second aggregator worker process: it joins the aggregator's consumer group, which rebalances the
        trades partitions between the two (each restores its new partitions from the checkpoint topic)."""
        port = free_port()
        argv = [sys.executable, "-m", "services.aggregator"]
        return self.start_extra(name, argv, env={"KLINES_AGGREGATOR__HTTP_PORT": str(port)}, health_port=port)

    def start_group_member(self, name: str, groups: dict[str, str]) -> Service:
        """A plain consumer-group member (:func:`group_member`) in each ``{group id: topic}``."""
        code = f"from harness import group_member; group_member({json.dumps(groups)!r})"
        paths = os.pathsep.join(str(REPO / path) for path in ("", "tests", "tests/e2e"))
        return self.start_extra(name, [sys.executable, "-c", code], env={"PYTHONPATH": paths})

    def stop_extra(self, name: str, *, hard: bool) -> int | None:
        """SIGKILL ``name`` (``hard``), or SIGTERM it and require exit 0 within the grace period."""
        service = self.extras[name]
        assert service.alive, f"{name} is not running:\n{service.tail(20)}"
        if hard:
            assert service.proc is not None
            service.proc.kill()
        code = service.stop(self.settings.service.shutdown_grace_s + 5)
        if not hard:
            assert code == 0, f"{name} exited {code} on SIGTERM:\n{service.tail(20)}"
        return code

    def engine_pids(self) -> list[int]:
        """The writers' embedded ClickHouse processes (``python -m services.shared.embedded``, their children)."""
        return child_pids(self.process("writers").pid, b"services.shared.embedded")

    # -- the replay exchange's fault API

    def exchange_fault(self, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.options.replay_port}/_control/{action}",
            data=json.dumps(body or {}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read())
        assert result.get("ok"), f"the exchange refused {action}: {result}"
        return result


def child_pids(parent: int, marker: bytes) -> list[int]:
    """The children of ``parent`` whose command line has an argument equal to ``marker``."""
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
        if marker in argv:
            found.append(pid)
    return found


def run_faulted(
    tape: Tape,
    tmp: Path,
    steps: list[Step],
    *,
    speed: float,
    pipeline_class: type[FaultPipeline] = FaultPipeline,
    verify: bool = False,
) -> tuple[FaultPipeline, str, int]:
    """Play ``tape`` through a :class:`FaultPipeline` in this process (its environment must be the run's:
    :func:`isolated_env`), drain and stop as ``klines run`` does; the pipeline, its output and exit code.
    ``verify``: before the exchange stops, compare the stored klines with its REST klines (``klines run
    --verify``; the summary's ``verify:`` line)."""
    from services.runner import RunOptions
    from services.shared.settings import load_settings

    options = RunOptions(
        offline=True,
        until_exhausted=True,
        speed=speed,
        files=list(tape.files),
        intervals=tape.intervals.split(","),
        venue=tape.venue,
        replay_port=free_port(),
        fresh=False,
        drain_stall_s=90,
        verify=verify,
    )
    code = 1
    with (tmp / "run.out").open("w") as out:
        pipeline = pipeline_class(load_settings(None), options, out, steps=steps)
        try:
            pipeline.start()
            reason = pipeline.watch(lambda: False)
            pipeline.say(f"stopping: {reason}")
            pipeline.drain_and_stop()
            summary = pipeline.report()
            for line in summary.lines():
                print(line, file=out)
            code = summary.exit_code
        finally:
            for service in [*pipeline.extras.values(), *pipeline.services]:
                service.stop(2)
            if pipeline.replay is not None:
                pipeline.replay.stop(5)
    text = (tmp / "run.out").read_text()
    assert [step.label for step in steps] == pipeline.done, text
    return pipeline, text, code


def check_snapshots(dsn: str, finalized_rows: dict[tuple[str, str, int], Row]) -> int:
    """``klines_snapshots``: per key, versions only increase in the order the aggregator published them (the
    topic's offsets; a row stored twice after a writer restart repeats its version), and the latest snapshot of
    a finalized kline agrees with its finalized row in every market field. Returns how many keys were compared."""
    settings = ClickHouseSettings(dsn=dsn)
    table = f"{settings.database}.{settings.snapshots_table}"
    fields = COLUMNS[:15]  # symbol .. taker_buy_quote_volume: everything but version and source
    client = clickhouse.connect(settings)
    try:
        physical = clickhouse.query_rows(
            client,
            f"SELECT symbol, interval, open_time, kafka_partition, kafka_offset, version FROM {table} "
            "ORDER BY symbol, interval, open_time, kafka_partition, kafka_offset",
        )
        latest = clickhouse.query_rows(client, f"SELECT {', '.join(fields)} FROM {table} FINAL")
    finally:
        clickhouse.close(settings)
    assert physical, "no snapshots were stored"
    previous: dict[tuple[str, str, int], tuple[int, int, int]] = {}
    for symbol, interval, open_time, partition, offset, version in physical:
        key = (symbol, interval, open_time)
        before = previous.get(key)
        if before is not None:
            assert before[0] == partition, f"{key}: snapshots in partitions {before[0]} and {partition}"
            assert version > before[2] or (version == before[2] and offset == before[1]), (
                f"{key}: snapshot version {version} at offset {offset} after version {before[2]} at offset {before[1]}"
            )
        previous[key] = (partition, offset, version)
    compared = 0
    for row in latest:
        key = (row[0], row[1], row[2])
        final = finalized_rows.get(key)
        if final is None:
            continue  # still open at the end of the tape
        differing = [
            f"{n}: snapshot {a!r} finalized {b!r}" for n, a, b in zip(fields, row, final[:15], strict=True) if a != b
        ]
        assert not differing, f"{key}: the latest snapshot disagrees with the finalized row: " + "; ".join(differing)
        compared += 1
    return compared


# ------------------------------------------------------------------------------------------------ group member


def group_member(groups_json: str) -> None:
    """A consumer-group member that joins each group of ``{group id: topic}`` (``json``), fetches what it is
    assigned, never commits and stores nothing, until SIGTERM, when it leaves its groups and exits 0.

    What a second writer process is to the writers' consumer groups up to its first insert (the embedded
    engine lets only one process open the ClickHouse directory): its joining and leaving rebalance the real
    writers, whose partitions move to it and back. Each line it prints is JSON: ``{"group", "assigned"}`` on
    every assignment, ``{"fetched": {group: records}}`` once a second.
    """
    from services.shared.kafka import make_consumer
    from services.shared.settings import load_settings

    groups: dict[str, str] = json.loads(groups_json)

    async def run() -> None:
        from aiokafka import ConsumerRebalanceListener

        kafka = load_settings(None).kafka
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        fetched = dict.fromkeys(groups, 0)

        class Printer(ConsumerRebalanceListener):  # type: ignore[misc]
            def __init__(self, group: str) -> None:
                self.group = group

            async def on_partitions_revoked(self, revoked: Any) -> None:
                return None

            async def on_partitions_assigned(self, assigned: Any) -> None:
                print(json.dumps({"group": self.group, "assigned": sorted(tp.partition for tp in assigned)}),
                      flush=True)  # fmt: skip

        consumers = []
        for group, topic in groups.items():
            consumer = make_consumer(kafka, group_id=group, client_suffix="chaos-member")
            consumer.subscribe([topic], listener=Printer(group))
            await consumer.start()
            consumers.append((group, consumer))
        last_print = 0.0
        while not stop.is_set():
            for group, consumer in consumers:
                batch = await consumer.getmany(timeout_ms=50, max_records=500)
                fetched[group] += sum(len(records) for records in batch.values())
            if time.monotonic() - last_print >= 1:
                last_print = time.monotonic()
                print(json.dumps({"fetched": fetched}), flush=True)
        for _, consumer in consumers:
            await consumer.stop()  # leaves the group at once (nothing is committed: enable_auto_commit is off)
        print(json.dumps({"fetched": fetched, "left": True}), flush=True)

    asyncio.run(run())


def member_lines(service: Service) -> list[dict[str, Any]]:
    """The JSON lines a :func:`group_member` printed so far."""
    lines = []
    for raw in service.log_path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines
