"""``klines run``: the whole pipeline on one machine, with one command.

Start order, each step shown as it happens:

1. the local Kafka broker (``deploy/kafka/kafka.sh start``), unless ``KAFKA_BOOTSTRAP`` names one;
2. the topics (``klines topics create``) and the ClickHouse schema (embedded chDB by default);
3. the market: Binance when its REST API answers (live), else the local replay exchange (``--offline`` forces
   it): a generated market, or recorded aggTrade files with ``--file``;
4. the services, each a process with its log under ``.state/logs/``: the writers (one process for both when
   ClickHouse is embedded, since one chDB directory opens in one process), the aggregator, then ingest; each is
   waited for on its ``/readyz``.

It runs until Ctrl-C, ``--duration`` seconds, or the replay is exhausted (``--until-exhausted``), printing the
traffic every few seconds. The stop is graceful and ordered so nothing is lost: ingest first (flushes every
accepted trade), then the aggregator once it has consumed every trade, then the writers once they have stored
every kline, then the exchange and the broker this command started. Last it prints what is stored and how to
query it, and with ``--verify`` compares every stored finalized kline with the exchange's REST klines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from services.cli import KAFKA_SH, REPO, command, print_table
from services.shared.settings import Settings

PY = sys.executable


@dataclass
class Service:
    """One child process of the pipeline."""

    name: str
    argv: list[str]
    health_port: int | None
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log_file: Any = None

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, env=env, cwd=REPO, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str, timeout: float = 2.0) -> Any:
        if self.health_port is None:
            return None
        url = f"http://127.0.0.1:{self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def ready(self) -> bool:
        if self.health_port is None:
            return self.alive
        return bool((self.get("/readyz") or {}).get("ready"))

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log_file is not None:
            self.log_file.close()
        return self.proc.returncode

    def tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class RunOptions:
    offline: bool = False
    duration: float = 0.0
    until_exhausted: bool = False
    speed: float = 60.0
    market_duration: str = "2h"
    start: str = "2026-01-01T00:00:00Z"
    seed: int = 1
    files: list[str] = field(default_factory=list)
    symbols: list[str] = field(default_factory=list)
    intervals: list[str] = field(default_factory=list)
    venue: str | None = None
    replay_port: int = 9443
    verify: bool = False
    keep_broker: bool = False


class LocalPipeline:
    """Starts, watches and stops the local pipeline; output goes to ``out``, one readable line per event."""

    def __init__(self, settings: Settings, options: RunOptions, out: TextIO | None = None) -> None:
        self.settings = settings
        self.options = options
        self.out = out or sys.stdout
        self.state = (REPO / settings.service.state_dir).resolve()
        self.logs = self.state / "logs"
        self.services: list[Service] = []
        self.replay: Service | None = None
        self.started_broker = False
        self.env = dict(os.environ)
        self.rest_url = settings.market.rest_url
        self.mode = "live"
        self.t0 = time.monotonic()

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", file=self.out, flush=True)

    # -- start ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        self.env.update(
            KLINES_SERVICE__LOG_FORMAT="json",
            KLINES_SERVICE__STATE_DIR=str(self.state),
            KAFKA_BOOTSTRAP=s.kafka.bootstrap,
            CLICKHOUSE_DSN=self._dsn(),
        )
        if self.options.symbols:
            self.env["KLINES_MARKET__SYMBOLS"] = json.dumps(self.options.symbols)
        if self.options.intervals:
            self.env["KLINES_MARKET__INTERVALS"] = json.dumps(self.options.intervals)
        if self.options.venue:
            self.env["KLINES_MARKET__VENUE"] = self.options.venue
        self._start_broker()
        self._prepare_storage()
        self._start_market()
        writers = self._writer_services()
        aggregator = Service(
            "aggregator", [PY, "-m", "services.aggregator"], s.aggregator.http_port, self.logs / "aggregator.log"
        )
        ingest = Service("ingest", [PY, "-m", "services.ingest"], s.service.ingest_http_port, self.logs / "ingest.log")
        # The gateway only reads the kline topics (live push to browsers): after the aggregator, before ingest.
        gateway = Service("gateway", [PY, "-m", "services.gateway"], s.gateway.http_port, self.logs / "gateway.log")
        for service in [*writers, aggregator, gateway, ingest]:
            self.say(f"starting {service.name} (log: {self._rel(service.log_path)})")
            service.start(self.env)
            self.services.append(service)
            self._wait_ready(service, timeout=90)
        self.say("pipeline is up: " + ", ".join(f"{x.name} ready" for x in self.services))
        self.say(f"live chart: http://{s.service.http_host}:{s.gateway.http_port}/ (gateway)")

    def _dsn(self) -> str:
        return self.settings.clickhouse.dsn

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(REPO))
        except ValueError:
            return str(path)

    def _start_broker(self) -> None:
        if os.environ.get("KAFKA_BOOTSTRAP"):
            self.say(f"using the Kafka broker at {self.settings.kafka.bootstrap} (KAFKA_BOOTSTRAP)")
            return
        port = self.settings.kafka.bootstrap.rsplit(":", 1)[1]
        self.say(f"starting the local Kafka broker on 127.0.0.1:{port} (Apache Kafka, KRaft) ...")
        env = dict(os.environ, KAFKA_PORT=port, KLINES_STATE_DIR=str(self.state))
        env.setdefault("KAFKA_LIBS_DIR", str(REPO / ".state" / "kafka-libs"))
        status = subprocess.run([str(KAFKA_SH), "status"], env=env, capture_output=True, text=True, check=False)
        if status.returncode == 0:
            self.say("the local Kafka broker is already running: using it")
            return
        result = subprocess.run([str(KAFKA_SH), "start"], env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"the Kafka broker did not start: {result.stderr.strip()}")
        self.started_broker = True
        self.say("Kafka broker is up")

    def _prepare_storage(self) -> None:
        from services.shared.kafka import ensure_topics

        created = asyncio.run(ensure_topics(self.settings.kafka))
        self.say(f"topics: {'created ' + ', '.join(created) if created else 'all present'}")
        # The schema is applied in a child process: an embedded chDB directory must be free for the writers.
        result = subprocess.run(
            [PY, "-m", "services.cli", "schema", "apply"], env=self.env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"ClickHouse schema: {(result.stderr or result.stdout).strip()}")
        self.say(f"ClickHouse ({self.env['CLICKHOUSE_DSN']}): schema ready")

    def _binance_reachable(self) -> bool:
        venue = self.options.venue or self.settings.market.venue
        path = "/fapi/v1/ping" if venue == "usdm" else "/api/v3/ping"
        try:
            with urllib.request.urlopen(self.settings.market.rest_url + path, timeout=3):  # noqa: S310
                return True
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _start_market(self) -> None:
        if not self.options.offline and not self.options.files and self._binance_reachable():
            self.say(f"market: Binance live ({self.settings.market.ws_url})")
            return
        why = "as asked" if self.options.offline or self.options.files else "Binance is not reachable"
        self.mode = "replay"
        o = self.options
        symbols = o.symbols or list(self.settings.market.symbols)
        venue = o.venue or self.settings.market.venue
        argv = [PY, "-m", "services.replay", "--port", str(o.replay_port), "--speed", str(o.speed), "--venue", venue]
        if o.files:
            for spec in o.files:
                argv += ["--file", spec]
        else:
            argv += ["--symbols", ",".join(symbols), "--seed", str(o.seed), "--start", o.start]
            argv += ["--duration", o.market_duration]
        self.replay = Service("replay exchange", argv, None, self.logs / "replay.log")
        self.replay.start(self.env)
        base = f"127.0.0.1:{o.replay_port}"
        self.rest_url = f"http://{base}"
        deadline = time.monotonic() + 30
        while not self._replay_status():
            if not self.replay.alive or time.monotonic() > deadline:
                raise RuntimeError(f"the replay exchange did not start:\n{self.replay.tail()}")
            time.sleep(0.2)
        feed = ", ".join(o.files) if o.files else f"generated {','.join(symbols)} for {o.market_duration}"
        self.say(f"market: local replay exchange on {base} ({why}; {feed}; speed ×{o.speed:g})")
        self.env.update(
            KLINES_MARKET__WS_URL=f"ws://{base}",
            KLINES_MARKET__REST_URL=self.rest_url,
            KLINES_AGGREGATOR__CLOCK="event",
        )
        if o.files:
            status = self._replay_status() or {}
            self.env["KLINES_MARKET__SYMBOLS"] = json.dumps(sorted(status.get("symbols", {})))

    def _replay_status(self) -> dict[str, Any] | None:
        try:
            url = f"http://127.0.0.1:{self.options.replay_port}/_control/status"
            with urllib.request.urlopen(url, timeout=2) as response:
                result: dict[str, Any] = json.loads(response.read())
                return result
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def _writer_services(self) -> list[Service]:
        # Both writers in one process (two consumer groups, two commit loops): required by an embedded chDB
        # directory, and fine with a server; compose and Kubernetes run them apart.
        port = self.settings.service.writers_http_port
        return [Service("writers", [PY, "-m", "services.writers"], port, self.logs / "writers.log")]

    def _wait_ready(self, service: Service, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waited = 0.0
        while not service.ready():
            if not service.alive:
                raise RuntimeError(f"{service.name} exited during start; last lines of its log:\n{service.tail(15)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{service.name} not ready after {timeout:.0f}s; see {self._rel(service.log_path)}")
            time.sleep(0.25)
            waited += 0.25
            if waited % 5 == 0:
                self.say(f"waiting for {service.name} to be ready ...")
        self.say(f"{service.name} is ready")

    # -- watch ------------------------------------------------------------------------------------------------

    def watch(self, stop_requested: Callable[[], bool]) -> str:
        """Print progress until a reason to stop; return that reason."""
        end = time.monotonic() + self.options.duration if self.options.duration > 0 else None
        last_report = 0.0
        while True:
            if stop_requested():
                return "Ctrl-C"
            if end is not None and time.monotonic() >= end:
                return f"--duration {self.options.duration:g}s reached"
            for service in self.services:
                if not service.alive:
                    return f"{service.name} exited unexpectedly ({self._rel(service.log_path)})"
            status = self._replay_status() if self.replay else None
            if self.options.until_exhausted and status and status.get("exhausted"):
                return "the replay is exhausted"
            if time.monotonic() - last_report >= 5:
                last_report = time.monotonic()
                self.say(self._progress(status))
            time.sleep(0.5)

    def _metric(self, name: str, key: str) -> float:
        service = next((s for s in self.services if s.name == name), None)
        metrics = service.get("/metrics") if service else None
        return float((metrics or {}).get(key, 0))

    def _progress(self, status: dict[str, Any] | None) -> str:
        parts = []
        if status:
            published = sum(int(s.get("published", 0)) for s in status.get("symbols", {}).values())
            market = time.strftime("%Y-%m-%d %H:%M", time.gmtime(int(status.get("market_time_ms", 0)) // 1000))
            parts.append(f"market {market} UTC, exchange sent {published} trades")
        parts.append(f"ingest published {self._metric('ingest', 'trades_published'):.0f}")
        parts.append(f"aggregator applied {self._metric('aggregator', 'trades_applied'):.0f}")
        parts.append(f"finalized {self._metric('aggregator', 'klines_finalized'):.0f} klines")
        writer = self.services[0].name if self.services else "writers"
        parts.append(f"stored {self._metric(writer, 'rows_inserted'):.0f} rows")
        return "; ".join(parts)

    # -- stop -------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        grace = self.settings.service.shutdown_grace_s + 5
        by_name = {s.name: s for s in self.services}
        if "ingest" in by_name:
            self.say("stopping ingest (flushes every accepted trade to Kafka) ...")
            self.say(f"ingest stopped (exit {by_name['ingest'].stop(grace)})")
        self._drain("aggregator", "trades")
        if "aggregator" in by_name:
            self.say("stopping the aggregator (checkpoints, flushes finalized klines) ...")
            self.say(f"aggregator stopped (exit {by_name['aggregator'].stop(grace)})")
        for service in self.services:
            if service.name == "gateway":
                self.say(f"gateway stopped (exit {service.stop(grace)})")
            elif service.name not in ("ingest", "aggregator"):
                self._drain(service.name, "klines")
                self.say(f"stopping {service.name} (flushes and commits) ...")
                self.say(f"{service.name} stopped (exit {service.stop(grace)})")

    def stop_broker(self) -> None:
        if self.started_broker and not self.options.keep_broker:
            env = dict(os.environ, KAFKA_PORT=self.settings.kafka.bootstrap.rsplit(":", 1)[1])
            env.update(KLINES_STATE_DIR=str(self.state))
            env.setdefault("KAFKA_LIBS_DIR", str(REPO / ".state" / "kafka-libs"))
            subprocess.run([str(KAFKA_SH), "stop"], env=env, capture_output=True, check=False)
            self.say("Kafka broker stopped")

    def _drain(self, name: str, what: str, timeout: float = 20.0) -> None:
        """Wait until ``name`` reports no consumer lag (it has read everything), up to ``timeout`` s."""
        service = next((s for s in self.services if s.name == name), None)
        if service is None or not service.alive:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            metrics = service.get("/metrics") or {}
            lag = metrics.get("lag")
            if lag is not None and float(lag) <= 0:
                time.sleep(1.0)  # one more clock tick / flush interval
                return
            time.sleep(0.5)
        self.say(
            f"{name} still had {what} to read after {timeout:.0f}s; stopping it anyway (it resumes from its commit)"
        )

    # -- report -----------------------------------------------------------------------------------------------

    def report(self) -> int:
        from services.shared import clickhouse

        ch = self.settings.clickhouse.model_copy(update={"dsn": self._dsn()})
        client = clickhouse.connect(ch)
        table = f"{ch.database}.{ch.finalized_table}"
        counts = clickhouse.query_rows(
            client,
            f"SELECT symbol, interval, count(), min(open_dt), max(open_dt) FROM {table} FINAL "
            "GROUP BY symbol, interval ORDER BY symbol, interval",
        )
        print("", file=self.out)
        print(f"Finalized klines stored in {ch.dsn} ({table}):", file=self.out)
        print_table(["symbol", "interval", "klines", "first open (UTC)", "last open (UTC)"], counts, self.out)
        latest = clickhouse.query_rows(
            client,
            f"SELECT symbol, interval, open_dt, open, high, low, close, volume, trade_count FROM {table} FINAL "
            "WHERE interval = (SELECT min(interval) FROM " + table + ") ORDER BY open_time DESC, symbol LIMIT 6",
        )
        if latest:
            print("\nLatest klines:", file=self.out)
            rows = [[r[0], r[1], r[2], *(_short(v) for v in r[3:8]), r[8]] for r in latest]
            print_table(["symbol", "interval", "open (UTC)", "o", "h", "l", "c", "v", "n"], rows, self.out)
        code = 0
        if self.options.verify and self.mode == "replay":
            from services.verify import print_report, verify

            settings = self.settings.model_copy(update={"clickhouse": ch})
            report = verify(settings, self.rest_url)
            print("", file=self.out)
            print_report(report, out=self.out)
            code = 0 if report.ok else 1
        clickhouse.close(ch)
        print(
            f"\nData: Kafka in {self._rel(self.state)}/kafka-*, ClickHouse in {ch.dsn.removeprefix('chdb://')}, "
            f"logs in {self._rel(self.logs)}/\nQuery it:\n"
            f'  .venv/bin/klines sql "SELECT * FROM {table} FINAL ORDER BY open_time DESC LIMIT 10"\n'
            f"  .venv/bin/klines tail finalized --from-beginning -n 5   (while the broker runs)",
            file=self.out,
        )
        return code


def _short(value: Any) -> str:
    text = format(value, "f").rstrip("0").rstrip(".") if hasattr(value, "as_tuple") else str(value)
    return text or "0"


def run_pipeline(settings: Settings, options: RunOptions, out: TextIO | None = None) -> int:
    pipeline = LocalPipeline(settings, options, out)
    stop = {"requested": False}

    def on_signal(_signum: int, _frame: Any) -> None:
        stop["requested"] = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 1
    try:
        pipeline.start()
        reason = pipeline.watch(lambda: stop["requested"])
        pipeline.say(f"stopping: {reason}")
        pipeline.stop()
        code = pipeline.report()
    except RuntimeError as exc:
        pipeline.say(f"error: {exc}")
        pipeline.stop()
    finally:
        for service in pipeline.services:
            service.stop(2)
        if pipeline.replay is not None and pipeline.replay.alive:
            pipeline.replay.stop(5)
            pipeline.say("replay exchange stopped")
        pipeline.stop_broker()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


@command("run", "start the whole pipeline locally: broker, ClickHouse, market, services")
def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offline", action="store_true", help="use the local replay exchange even if Binance answers")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0 = until Ctrl-C)")
    p.add_argument("--until-exhausted", action="store_true", help="stop when the replay has sent everything")
    p.add_argument("--speed", type=float, default=60, help="replay: market time per real time (0 = max)")
    p.add_argument("--market-duration", default="2h", help="replay: generated market length (e.g. 30m, 2h)")
    p.add_argument("--start", default="2026-01-01T00:00:00Z", help="replay: generated market start (UTC)")
    p.add_argument("--seed", type=int, default=1, help="replay: generator seed")
    p.add_argument("--file", action="append", default=[], metavar="PATH[:SYMBOL]", help="replay recorded files")
    p.add_argument("--symbols", help="comma-separated symbols (default: market.symbols)")
    p.add_argument("--intervals", help="comma-separated intervals (default: market.intervals)")
    p.add_argument("--venue", choices=["spot", "usdm"], help="default: market.venue")
    p.add_argument("--replay-port", type=int, default=9443)
    p.add_argument("--verify", action="store_true", help="at the end, compare stored klines with the exchange's")
    p.add_argument("--keep-broker", action="store_true", help="leave the broker running at the end")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    options = RunOptions(
        offline=args.offline,
        duration=args.duration,
        until_exhausted=args.until_exhausted,
        speed=args.speed,
        market_duration=args.market_duration,
        start=args.start,
        seed=args.seed,
        files=args.file,
        symbols=[s.strip().upper() for s in args.symbols.split(",")] if args.symbols else [],
        intervals=[i.strip() for i in args.intervals.split(",")] if args.intervals else [],
        venue=args.venue,
        replay_port=args.replay_port,
        verify=args.verify,
        keep_broker=args.keep_broker,
    )
    return run_pipeline(settings, options)
