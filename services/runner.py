"""``klines run``: the whole pipeline on one machine, with one command.

Start order, each step shown as it happens:

1. the market: Binance when its REST API answers (live), else the local replay exchange (``--offline`` forces
   it): a generated market, or recorded aggTrade files with ``--file``;
2. the run's namespace: a replay run is *fresh* by default (``--fresh``/``--no-fresh`` decide explicitly), so
   it gets topics, consumer groups, an aggregator checkpoint and a ClickHouse database of its own (see
   :func:`fresh_namespace`); a live run continues in the configured ones;
3. the local Kafka broker (``deploy/kafka/kafka.sh start``), unless ``KAFKA_BOOTSTRAP`` names one;
4. the topics (``klines topics create``) and the ClickHouse schema (embedded chDB by default);
5. the services, each a process with its log under ``.state/logs/``: the writers (one process for both when
   ClickHouse is embedded, since one chDB directory opens in one process), the aggregator, the gateway, then
   ingest; each is waited for on its ``/readyz``.

It runs until Ctrl-C, ``--duration`` seconds, or the replay is exhausted (``--until-exhausted``), printing the
traffic every few seconds. Then it drains, in order, while every service still runs (a second Ctrl-C skips
the waiting):

1. the input stops: the replay exchange is paused (unless exhausted), and ingest is waited for until it has
   published every trade the exchange sent (``/_control/status`` against ingest's ``/metrics``); a live run
   stops ingest instead (its stop flushes every accepted trade);
2. the aggregator: no lag, every trade accounted for, and every finalized kline confirmed by the broker
   (``unconfirmed_finalized`` and ``finalized_queued`` zero);
3. the writers: no lag, nothing buffered, every finalized kline stored.

Each wait lasts as long as the figures move and gives up after ``--drain-stall`` seconds without progress, so
a big backlog is never cut short and a stuck service does not hang the command. Then the services stop in
order (ingest, aggregator, writers, gateway), then the exchange and the broker this command started. Last it
prints what is stored, with ``--verify`` compares every stored finalized kline with the exchange's REST
klines, and prints a summary (:class:`RunSummary`); the exit status is non-zero when anything was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from services.commands import KAFKA_SH, REPO, command
from services.console import print_table
from services.shared.settings import KafkaSettings, Settings

PY = sys.executable

#: Fresh runs whose topics and ClickHouse database are kept; older ones are removed at the next fresh start.
KEEP_RUNS = 3


@dataclass
class Service:
    """One child process of the pipeline."""

    name: str
    argv: list[str]
    health_port: int | None
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log_file: Any = None
    log_start: int = 0  # where this run's lines begin in the (appended) log file
    starts: int = 0  # how often it was started in this run (more than once: restarted, its counters began again)

    def start(self, env: dict[str, str]) -> None:
        self.starts += 1
        if self.starts == 1:
            self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
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
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code (negative: killed)."""
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
            self.log_file = None
        return self.proc.returncode

    def tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_records(self) -> Iterator[dict[str, Any]]:
        """This run's JSON log lines (lines that are not JSON objects are skipped)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_start)
                for raw in log:
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(record, dict):
                        yield record
        except OSError:
            return


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
    fresh: bool | None = None  # None: fresh for a replay run, continuing for a live one
    drain_stall_s: float = 60.0
    #: Zipf activity of a generated market (the k-th symbol trades 1/k**zipf as often as the first, which
    #: trades ``zipf_top`` taker orders a second); None: each symbol's own profile.
    zipf: float | None = None
    zipf_top: float = 20.0
    #: How long the replay exchange may take to answer. It generates (or reads) the whole market before it
    #: answers: a few seconds for a few symbols, about 20-30 s per million trades on a busy 2-core machine.
    replay_start_timeout_s: float = 600.0


@dataclass
class RunSummary:
    """What one run did and lost; :attr:`exit_code` is non-zero when anything was lost or stopped badly.

    Counts the pipeline could not report are ``None`` (shown as ``?``). Lost means: a ``DATA_LOSS`` (the
    aggregator's ``data_loss``, ingest's ``data_loss_events``, or any log line with ``log_type=DATA_LOSS``),
    trades dropped by ingest (held behind a hole at its stop, removed with a symbol, unacknowledged), trades the
    exchange sent that ingest never published, a drain that gave up, a service that did not stop with exit 0,
    or a failed verification.
    """

    mode: str = "replay"
    trades_sent: int | None = None
    trades_published: int | None = None
    trades_applied: int | None = None
    klines_finalized: int | None = None
    klines_stored: int | None = None
    data_loss: int = 0
    dead_letters: int = 0
    held_dropped: int = 0
    dropped_other: int = 0
    exits: dict[str, int | None] = field(default_factory=dict)
    drain_problems: list[str] = field(default_factory=list)
    verify: str | None = None  # the verdict line; None when not verified
    verify_ok: bool | None = None
    #: The aggregator's longest single batch apply (its event loop's longest stall from the hot path) and how
    #: often flow control stopped its input while its output drained (information, not a problem).
    longest_apply_s: float | None = None
    flow_pauses: int = 0
    flow_paused_s: float = 0.0

    @property
    def dropped(self) -> int:
        return self.held_dropped + self.dropped_other

    @property
    def unpublished(self) -> int:
        if self.trades_sent is None or self.trades_published is None:
            return 0
        return max(0, self.trades_sent - self.trades_published)

    def problems(self) -> list[str]:
        found: list[str] = []
        if self.data_loss:
            found.append(f"{self.data_loss} DATA_LOSS")
        if self.dropped:
            found.append(f"{self.dropped} trades dropped by ingest ({self.held_dropped} held at its stop)")
        if self.unpublished:
            found.append(f"{self.unpublished} trades the exchange sent were never published")
        for name, code in self.exits.items():
            if code != 0:
                how = "did not stop" if code is None else f"exit {code}" + (" (killed)" if code < 0 else "")
                found.append(f"{name} {how}")
        found.extend(self.drain_problems)
        if self.verify_ok is False:
            found.append("verify failed")
        return found

    @property
    def exit_code(self) -> int:
        return 1 if self.problems() else 0

    def lines(self) -> list[str]:
        def n(value: int | None) -> str:
            return "?" if value is None else str(value)

        sent = n(self.trades_sent) if self.mode == "replay" else "- (live)"
        exits = ", ".join(f"{name} {n(code)}" for name, code in self.exits.items()) or "-"
        longest = "?" if self.longest_apply_s is None else f"{self.longest_apply_s:.3f}"
        problems = self.problems()
        return [
            "Summary:",
            f"  trades: sent {sent} (exchange), published {n(self.trades_published)} (ingest), "
            f"applied {n(self.trades_applied)} (aggregator)",
            f"  klines: finalized {n(self.klines_finalized)} (aggregator), stored {n(self.klines_stored)} "
            "(ClickHouse, FINAL)",
            f"  DATA_LOSS: {self.data_loss}",
            f"  dead letters: {self.dead_letters}",
            f"  ingest held/dropped: {self.held_dropped} held at stop and dropped, {self.dropped_other} dropped "
            "otherwise",
            f"  service exits: {exits}",
            f"  aggregator: longest batch apply {longest} s, input paused {self.flow_pauses} times for "
            f"{self.flow_paused_s:.1f} s while its output drained",
            f"  drain: {'complete' if not self.drain_problems else '; '.join(self.drain_problems)}",
            f"  verify: {self.verify or 'not run'}",
            self.verdict(problems),
        ]

    def verdict(self, problems: list[str]) -> str:
        """The last line. Dead letters are no loss (each is a record refused with its reason, e.g. a trade too late
        for its kline, as ``klines replay`` refuses it too), but a run that made any is not silent about it."""
        if problems:
            return "result: FAILED: " + "; ".join(problems)
        if self.dead_letters:
            refused = f"{self.dead_letters} records refused with a reason"
            return f"result: OK, nothing lost; {refused}: see the dead-letter topic"
        return "result: OK, nothing lost"


def fresh_namespace(settings: Settings, run_id: str) -> dict[str, str]:
    """Environment overrides that give one run its own state: the configured topic names prefixed with the
    run id, a client id (hence consumer groups and the aggregator's checkpoint topic) with it, and the
    ClickHouse database ``<database>_<run id>`` (in the same ClickHouse, so ``klines sql`` reaches it)."""
    topics = settings.kafka.topics
    return {
        "KLINES_KAFKA__TOPICS__TRADES": f"{run_id}.{topics.trades}",
        "KLINES_KAFKA__TOPICS__FINALIZED": f"{run_id}.{topics.finalized}",
        "KLINES_KAFKA__TOPICS__SNAPSHOTS": f"{run_id}.{topics.snapshots}",
        "KLINES_KAFKA__TOPICS__DEAD_LETTER": f"{run_id}.{topics.dead_letter}",
        "KLINES_KAFKA__CLIENT_ID": f"{settings.kafka.client_id}-{run_id}",
        "KLINES_CLICKHOUSE__DATABASE": f"{settings.clickhouse.database}_{run_id.replace('-', '_')}",
    }


def new_run_id(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"run-{stamp}-{secrets.token_hex(2)}"


def apply_env(settings: Settings, env: dict[str, str]) -> Settings:
    """``settings`` with the ``KLINES_*`` overrides this command hands its services (so that its own reads,
    the report and ``--verify`` use what the services use)."""
    kafka, ch, market = settings.kafka, settings.clickhouse, settings.market
    topics = kafka.topics.model_copy(
        update={
            key: env[f"KLINES_KAFKA__TOPICS__{key.upper()}"]
            for key in ("trades", "finalized", "snapshots", "dead_letter")
            if f"KLINES_KAFKA__TOPICS__{key.upper()}" in env
        }
    )
    kafka = kafka.model_copy(
        update={"topics": topics, "client_id": env.get("KLINES_KAFKA__CLIENT_ID", kafka.client_id)}
    )
    ch = ch.model_copy(
        update={
            "dsn": env.get("CLICKHOUSE_DSN", ch.dsn),
            "database": env.get("KLINES_CLICKHOUSE__DATABASE", ch.database),
        }
    )
    updates: dict[str, Any] = {}
    if "KLINES_MARKET__SYMBOLS" in env:
        updates["symbols"] = tuple(json.loads(env["KLINES_MARKET__SYMBOLS"]))
    if "KLINES_MARKET__INTERVALS" in env:
        updates["intervals"] = tuple(json.loads(env["KLINES_MARKET__INTERVALS"]))
    if "KLINES_MARKET__VENUE" in env:
        updates["venue"] = env["KLINES_MARKET__VENUE"]
    if "KLINES_MARKET__REST_URL" in env:
        updates["rest_url"] = env["KLINES_MARKET__REST_URL"]
    return settings.model_copy(update={"kafka": kafka, "clickhouse": ch, "market": market.model_copy(update=updates)})


def _num(metrics: dict[str, Any] | None, key: str) -> int:
    """A counter from a ``/metrics`` answer; a missing or null key counts as 0."""
    value = (metrics or {}).get(key)
    return int(value) if isinstance(value, int | float) else 0


def _with_absolute_dsn(settings: Settings) -> Settings:
    """``settings`` with a relative embedded DSN (``chdb:.state/chdb``, the default) made absolute against this
    process's working directory, as the setting documents. The services run with the repository as their working
    directory, so a relative DSN handed on as it is would name another directory whenever ``klines run`` is
    started elsewhere: the schema would be applied in one and the writers would look in the other."""
    dsn = settings.clickhouse.dsn
    if not dsn.startswith("chdb:") or dsn.startswith("chdb://"):
        return settings
    absolute = "chdb://" + str(Path(dsn.removeprefix("chdb:")).resolve())
    return settings.model_copy(update={"clickhouse": settings.clickhouse.model_copy(update={"dsn": absolute})})


class LocalPipeline:
    """Starts, watches, drains and stops the local pipeline; output goes to ``out``, one readable line per event."""

    def __init__(self, settings: Settings, options: RunOptions, out: TextIO | None = None) -> None:
        self.settings = _with_absolute_dsn(settings)
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
        self.run_id: str | None = None
        self.t0 = time.monotonic()
        self.metrics: dict[str, dict[str, Any]] = {}  # the last /metrics answer of each service
        self.exits: dict[str, int | None] = {}
        self.drain_problems: list[str] = []
        self.exchange_sent: int | None = None
        #: Distinct trades found in the trades topic by the drain of an ingest that was restarted during the run
        #: (its own count began again at each start); None when ingest ran once.
        self.published_in_topic: int | None = None
        self.abort_requested: Callable[[], bool] = lambda: False

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", file=self.out, flush=True)

    # -- start ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        self.env.update(
            KLINES_SERVICE__LOG_FORMAT="json",
            KLINES_SERVICE__STATE_DIR=str(self.state),
            KAFKA_BOOTSTRAP=s.kafka.bootstrap,
            CLICKHOUSE_DSN=s.clickhouse.dsn,
        )
        if self.options.symbols:
            self.env["KLINES_MARKET__SYMBOLS"] = json.dumps(self.options.symbols)
        if self.options.intervals:
            self.env["KLINES_MARKET__INTERVALS"] = json.dumps(self.options.intervals)
        if self.options.venue:
            self.env["KLINES_MARKET__VENUE"] = self.options.venue
        self._choose_market()
        self._choose_namespace()
        self._start_broker()
        self._prune_old_runs()
        self._prepare_storage()
        self._start_market()
        self.settings = s = apply_env(self.settings, self.env)
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

    def _rel(self, path: Path) -> str:
        """``path`` as the user can type it from where ``klines run`` was started."""
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)

    def _choose_market(self) -> None:
        o = self.options
        if not o.offline and not o.files and self._binance_reachable():
            self.mode = "live"
        else:
            self.mode = "replay"

    def _choose_namespace(self) -> None:
        """A replay run starts from nothing unless ``--no-fresh``: its tape starts over, so the previous run's
        trades, checkpoint (other intervals?) and klines would only mix with it. A live run continues."""
        fresh = self.options.fresh if self.options.fresh is not None else self.mode == "replay"
        if not fresh:
            t = self.settings.kafka.topics
            self.say(f"state: continuing in the configured topics ({t.trades}, ...) and ClickHouse database")
            return
        self.run_id = new_run_id()
        self.env.update(fresh_namespace(self.settings, self.run_id))
        self.say(
            f"state: fresh run {self.run_id} (its own topics, consumer groups, checkpoint and ClickHouse "
            f"database {self.env['KLINES_CLICKHOUSE__DATABASE']})"
        )

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

    def _prune_old_runs(self) -> None:
        """Record this fresh run under ``<state>/runs/``; remove the topics and ClickHouse database of fresh runs
        older than the last :data:`KEEP_RUNS` that used the same broker and ClickHouse."""
        if self.run_id is None:
            return
        runs = self.state / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        bootstrap, dsn = self.settings.kafka.bootstrap, self.env["CLICKHOUSE_DSN"]
        record = {"run_id": self.run_id, "bootstrap": bootstrap, "clickhouse_dsn": dsn}
        record["database"] = self.env["KLINES_CLICKHOUSE__DATABASE"]
        (runs / f"{self.run_id}.json").write_text(json.dumps(record) + "\n")
        old = sorted(runs.glob("run-*.json"))[:-KEEP_RUNS]
        if not old:
            return
        from services.shared.kafka import delete_topics

        try:
            names = asyncio.run(_topic_names(self.settings))
        except Exception as exc:
            self.say(f"older runs not removed: the topics could not be listed ({exc})")
            return
        removed = 0
        for path in old:
            try:
                previous = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            if previous.get("bootstrap") != bootstrap or previous.get("clickhouse_dsn") != dsn:
                continue
            run_id = str(previous.get("run_id", ""))
            doomed = [name for name in names if run_id and run_id in name]
            database = str(previous.get("database", ""))
            try:
                asyncio.run(delete_topics(self.settings.kafka, doomed))
            except Exception as exc:
                self.say(f"the topics of {run_id} were not removed: {exc}")
                continue
            if database.replace("_", "").isalnum():
                subprocess.run(
                    [PY, "-m", "services.cli", "sql", f"DROP DATABASE IF EXISTS {database}"],
                    env=self.env,
                    capture_output=True,
                    check=False,
                )
            path.unlink(missing_ok=True)
            removed += 1
        if removed:
            self.say(f"removed the topics and ClickHouse databases of {removed} older run(s) (keeps {KEEP_RUNS})")

    def _prepare_storage(self) -> None:
        from services.shared.kafka import ensure_topics

        kafka = apply_env(self.settings, self.env).kafka
        created = asyncio.run(ensure_topics(kafka))
        prefix = f"{self.run_id}." if self.run_id else ""
        if created and prefix and all(name.startswith(prefix) for name in created):
            listed = prefix + "{" + ", ".join(name.removeprefix(prefix) for name in created) + "}"
        else:
            listed = ", ".join(created)
        self.say(f"topics: {'created ' + listed if created else 'all present'}")
        # The schema is applied in a child process: an embedded chDB directory must be free for the writers.
        result = subprocess.run(
            [PY, "-m", "services.cli", "schema", "apply"], env=self.env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"ClickHouse schema: {(result.stderr or result.stdout).strip()}")
        database = self.env.get("KLINES_CLICKHOUSE__DATABASE", self.settings.clickhouse.database)
        self.say(f"ClickHouse ({self.env['CLICKHOUSE_DSN']}, database {database}): schema ready")

    def _binance_reachable(self) -> bool:
        venue = self.options.venue or self.settings.market.venue
        path = "/fapi/v1/ping" if venue == "usdm" else "/api/v3/ping"
        try:
            with urllib.request.urlopen(self.settings.market.rest_url + path, timeout=3):  # noqa: S310
                return True
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _start_market(self) -> None:
        if self.mode == "live":
            self.say(f"market: Binance live ({self.settings.market.ws_url})")
            return
        o = self.options
        why = "as asked" if o.offline or o.files else "Binance is not reachable"
        symbols = o.symbols or list(self.settings.market.symbols)
        venue = o.venue or self.settings.market.venue
        argv = [PY, "-m", "services.replay", "--port", str(o.replay_port), "--speed", str(o.speed), "--venue", venue]
        # Market time starts once ingest subscribed to every symbol: it subscribes in steps (200 streams in the
        # URL, the rest by paced SUBSCRIBE messages, 1,024 per connection), and at --speed 0 a market started by
        # the first subscription would be over before the last one, its trades never seen.
        argv += ["--autostart", "on_all_subscribed"]
        if o.files:
            for spec in o.files:
                argv += ["--file", spec]
        else:
            argv += ["--symbols", ",".join(symbols), "--seed", str(o.seed), "--start", o.start]
            argv += ["--duration", o.market_duration]
            if o.zipf is not None:
                argv += ["--zipf", str(o.zipf), "--zipf-top", str(o.zipf_top)]
        self.replay = Service("replay exchange", argv, None, self.logs / "replay.log")
        self.replay.start(self.env)
        base = f"127.0.0.1:{o.replay_port}"
        self.rest_url = f"http://{base}"
        self._wait_replay(o.replay_start_timeout_s)
        feed = ", ".join(Path(f).name for f in o.files) if o.files else f"generated {_listed(symbols)}"
        self.say(f"market: local replay exchange on {base} ({why}; {feed}; {venue}; speed ×{o.speed:g})")
        self.env.update(
            KLINES_MARKET__WS_URL=f"ws://{base}",
            KLINES_MARKET__REST_URL=self.rest_url,
            KLINES_MARKET__VENUE=venue,
            KLINES_AGGREGATOR__CLOCK="event",
        )
        if o.files:
            status = self._replay_status() or {}
            self.env["KLINES_MARKET__SYMBOLS"] = json.dumps(sorted(status.get("symbols", {})))

    def _wait_replay(self, timeout_s: float) -> None:
        """Wait until the exchange answers: it generates (or reads) the whole market first, which takes time in
        proportion to the trades (a large generated market takes minutes), so the wait lasts as long as the
        process is alive, up to ``timeout_s``, and says every 10 s that it is still waiting."""
        assert self.replay is not None
        started = time.monotonic()
        said = started
        while not self._replay_status():
            now = time.monotonic()
            if not self.replay.alive:
                raise RuntimeError(f"the replay exchange exited during its start:\n{self.replay.tail()}")
            if now - started > timeout_s:
                raise RuntimeError(
                    f"the replay exchange did not answer within {timeout_s:.0f} s (a market that large takes "
                    f"longer to generate: raise RunOptions.replay_start_timeout_s):\n{self.replay.tail()}"
                )
            if now - said >= 10:
                said = now
                self.say(f"waiting for the replay exchange: it generates the market first ({now - started:.0f} s)")
            time.sleep(0.2)

    def _replay_status(self) -> dict[str, Any] | None:
        try:
            url = f"http://127.0.0.1:{self.options.replay_port}/_control/status"
            with urllib.request.urlopen(url, timeout=2) as response:
                result: dict[str, Any] = json.loads(response.read())
                return result
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def _replay_control(self, action: str) -> bool:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.options.replay_port}/_control/{action}", data=b"{}", method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                return bool(json.loads(response.read()).get("ok"))
        except (urllib.error.URLError, OSError, ValueError):
            return False

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
                    self.drain_problems.append(f"{service.name} exited unexpectedly")
                    return f"{service.name} exited unexpectedly ({self._rel(service.log_path)})"
            status = self._replay_status() if self.replay else None
            if self.options.until_exhausted and status and status.get("exhausted"):
                return "the replay is exhausted"
            if time.monotonic() - last_report >= 5:
                last_report = time.monotonic()
                self.say(self._progress(status))
            time.sleep(0.5)

    def _service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)

    def _read(self, name: str) -> dict[str, Any] | None:
        """``/metrics.json`` of ``name`` (remembered as its last known figures), or None if it does not answer."""
        service = self._service(name)
        metrics = service.get("/metrics.json") if service is not None and service.alive else None
        if isinstance(metrics, dict):
            self.metrics[name] = metrics
            return metrics
        return None

    def _metric(self, name: str, key: str) -> int:
        return _num(self._read(name), key)

    @staticmethod
    def _sent(status: dict[str, Any] | None) -> int | None:
        if not status:
            return None
        return sum(int(s.get("published", 0)) for s in status.get("symbols", {}).values())

    def _progress(self, status: dict[str, Any] | None) -> str:
        parts = []
        if status:
            market = time.strftime("%Y-%m-%d %H:%M", time.gmtime(int(status.get("market_time_ms", 0)) // 1000))
            parts.append(f"market {market} UTC, exchange sent {self._sent(status)} trades")
        parts.append(f"ingest published {self._metric('ingest', 'trades_published')}")
        parts.append(f"aggregator applied {self._metric('aggregator', 'trades_applied')}")
        parts.append(f"finalized {self._metric('aggregator', 'klines_finalized')} klines")
        parts.append(f"stored {self._metric('writers', 'rows_inserted')} rows")
        return "; ".join(parts)

    # -- drain and stop ---------------------------------------------------------------------------------------

    def drain_and_stop(self) -> None:
        """Drain in order while everything runs (see the module docstring), then stop in order."""
        grace = self.settings.service.shutdown_grace_s + 5
        if self.replay is not None and self.replay.alive:
            status = self._replay_status() or {}
            if not status.get("exhausted"):
                paused = self._replay_control("pause")
                self.say("replay exchange paused" if paused else "the replay exchange did not pause")
            self._wait("ingest", self._ingest_drained)
        else:
            self._stop("ingest", grace, "flushes every accepted trade to Kafka")
        # One more clock tick: the last snapshots and checkpoint of what was just applied.
        self._wait(
            "aggregator", self._aggregator_drained, settle_s=self.settings.aggregator.snapshot_interval_ms / 1000
        )
        self._wait("writers", self._writers_drained)
        self._stop("ingest", grace, "flushes every accepted trade to Kafka")
        self._stop("aggregator", grace, "checkpoints, flushes finalized klines")
        # What the aggregator sent while it stopped (a live clock can close klines then) is stored too.
        self._wait("writers", self._writers_drained, quiet=True)
        self._stop("writers", grace, "flushes and commits")
        self._stop("gateway", grace, "")

    def stop(self) -> None:
        """Stop what runs, in order, without draining (after a start failure)."""
        grace = self.settings.service.shutdown_grace_s + 5
        for name in ("ingest", "aggregator", "writers", "gateway"):
            self._stop(name, grace, "")

    def _stop(self, name: str, grace: float, what: str) -> None:
        service = self._service(name)
        if service is None or name in self.exits:
            return
        if service.alive:
            self._read(name)  # the last figures before it goes
            self.say(f"stopping {name} ({what}) ..." if what else f"stopping {name} ...")
        code = service.stop(grace)
        self.exits[name] = code
        self.say(f"{name} stopped (exit {code})")

    def _wait(
        self, label: str, probe: Callable[[], tuple[bool, Any, str]], *, quiet: bool = False, settle_s: float = 0.0
    ) -> bool:
        """Wait until ``probe`` says done, and still says so with the same figures ``settle_s`` later. It returns
        (done, figures that show progress, description); the wait lasts while the figures change and gives up
        after ``drain_stall_s`` without a change."""
        service = self._service(label)
        if service is None:
            return True
        stall = self.options.drain_stall_s
        started = moved = last_say = time.monotonic()
        last: Any = None
        done_since: tuple[float, Any] | None = None
        while True:
            if not service.alive:
                self.drain_problems.append(f"{label} exited before it drained")
                self.say(f"{label} exited before it drained ({self._rel(service.log_path)})")
                return False
            done, figures, text = probe()
            now = time.monotonic()
            if not done:
                done_since = None
            elif done_since is None or done_since[1] != figures:
                done_since = (now, figures)
            if done_since is not None and now - done_since[0] >= settle_s:
                if not quiet or now - started > 1:
                    self.say(f"{label} drained: {text}")
                return True
            if figures != last:
                last, moved = figures, now
            if now - moved > stall:
                self.drain_problems.append(f"{label} did not drain ({text})")
                self.say(f"{label}: no progress for {stall:g}s ({text}); giving up waiting")
                return False
            if self.abort_requested():
                self.drain_problems.append(f"{label} drain interrupted ({text})")
                self.say(f"{label}: drain interrupted ({text})")
                return False
            if now - last_say >= 5:
                last_say = now
                self.say(f"draining {label}: {text}")
            time.sleep(0.25)

    def _ingest_drained(self) -> tuple[bool, Any, str]:
        status = self._replay_status()
        sent = self._sent(status)
        if sent is not None:
            self.exchange_sent = sent
        m = self._read("ingest")
        published, held = _num(m, "trades_published"), _num(m, "queue_held")
        if m is None or sent is None:
            return False, None, "no answer from ingest or the exchange"
        ingest = self._service("ingest")
        if ingest is not None and ingest.starts > 1:
            return self._ingest_drained_by_topic(status or {}, m, sent)
        done = published >= sent and _num(m, "queue_inflight") == 0
        text = f"published {published} of {sent} trades the exchange sent ({held} held)"
        return done, (published, held, _num(m, "trades_received"), sent), text

    def _ingest_drained_by_topic(self, status: dict[str, Any], m: dict[str, Any], sent: int) -> tuple[bool, Any, str]:
        """The drain of an ingest started more than once: its ``trades_published`` counts only since its last
        start, so the trades topic itself is read. Done when nothing is held or unacknowledged, every symbol's
        last ``a`` in the topic is the last the exchange sent, and then the topic holds as many distinct trades
        as the exchange sent (a trade published twice, around a kill, counts once)."""
        from services.ingest.recovery import recover_last_ids

        wanted = {name: int(s["last_id"]) for name, s in (status.get("symbols") or {}).items() if s.get("published")}
        held, inflight = _num(m, "queue_held"), _num(m, "queue_inflight")
        try:
            tails = asyncio.run(recover_last_ids(self.settings.kafka, wanted)).last
        except Exception as exc:  # the broker did not answer: not drained yet
            return False, None, f"the trades topic could not be read ({exc})"
        behind = sorted(name for name, last in wanted.items() if tails.get(name, -1) < last)
        figures = (held, inflight, tuple(sorted(tails.items())), sent)
        if behind or held or inflight:
            text = f"{held} held, {inflight} unacknowledged, behind the exchange in {', '.join(behind) or 'none'}"
            return False, figures, text
        try:
            distinct = asyncio.run(_distinct_trades(self.settings.kafka))
        except Exception as exc:
            return False, figures, f"the trades topic could not be read ({exc})"
        self.published_in_topic = distinct
        text = f"{distinct} distinct trades in the topic of {sent} the exchange sent (ingest restarted)"
        return distinct >= sent, (*figures, distinct), text

    def _aggregator_drained(self) -> tuple[bool, Any, str]:
        published = _num(self.metrics.get("ingest"), "trades_published")
        m = self._read("aggregator")
        if m is None:
            return False, None, "no answer"
        lag = m.get("lag")
        accounted = sum(_num(m, k) for k in ("trades_applied", "late_trades", "duplicate_trades", "rejected_trades"))
        unconfirmed, queued = _num(m, "unconfirmed_finalized"), _num(m, "finalized_queued")
        # Read to the end of every trades partition (offsets survive a restart of the aggregator; its counters
        # count only what this incarnation applied after restoring its checkpoint).
        ends = self._trades_end_offsets()
        read = {int(p): int(o) for p, o in (m.get("read_offsets") or {}).items()}
        at_end = bool(ends) and all(read.get(p, -1) >= end for p, end in ends.items())
        done = lag == 0 and unconfirmed == 0 and queued == 0 and at_end
        text = (
            f"lag {'?' if lag is None else lag}, {sum(read.values())} of {sum(ends.values())} trades records read "
            f"({accounted} of {published} trades applied since its start), "
            f"{_num(m, 'klines_finalized')} klines finalized, {unconfirmed} unconfirmed ({queued} queued)"
        )
        # Not the finalized count: on a wall clock (live) it grows every tick (1s klines, empty ones included)
        # for as long as the aggregator runs, and the settle would wait for a pause that never comes. What the
        # clock closes after the drain is sent at the aggregator's stop and stored by the writers' last drain.
        figures = (lag, accounted, unconfirmed, queued)
        return done, figures, text

    def _trades_end_offsets(self) -> dict[int, int]:
        from services.shared.kafka import end_offsets

        try:
            return asyncio.run(end_offsets(self.settings.kafka, self.settings.kafka.topics.trades))
        except Exception:  # the broker did not answer: not drained yet
            return {}

    def _writers_drained(self) -> tuple[bool, Any, str]:
        finalized = _num(self.metrics.get("aggregator"), "klines_finalized")
        m = self._read("writers")
        if m is None:
            return False, None, "no answer"
        own = (m.get("writers") or {}).get("finalized_writer") or m
        handled = _num(own, "rows_inserted") + _num(own, "dead_letters")
        lag, buffered = _num(m, "lag"), _num(m, "buffered")
        writers = self._service("writers")
        if writers is not None and writers.starts > 1:
            # Restarted: its counters began again, so what it stored is read from its consumer group's
            # committed offsets (it commits after the insert) against the end of the finalized topic.
            behind = self._finalized_uncommitted()
            done = lag == 0 and buffered == 0 and behind == 0
            text = (
                f"lag {lag}, {buffered} buffered, "
                f"{'?' if behind is None else behind} finalized records not yet stored and committed (restarted)"
            )
            return done, (lag, buffered, _num(m, "rows_inserted"), behind), text
        done = lag == 0 and buffered == 0 and handled >= finalized
        text = f"lag {lag}, {buffered} buffered, {handled} of {finalized} finalized klines stored"
        return done, (lag, buffered, _num(m, "rows_inserted")), text

    def _finalized_uncommitted(self) -> int | None:
        """Records of the finalized topic past the finalized writer's committed offsets; None if unknown."""
        from services.finalized_writer import finalized_spec

        try:
            return asyncio.run(_uncommitted(self.settings.kafka, finalized_spec(self.settings).group_id))
        except Exception:  # the broker did not answer: not drained yet
            return None

    def stop_broker(self) -> None:
        if self.started_broker and not self.options.keep_broker:
            env = dict(os.environ, KAFKA_PORT=self.settings.kafka.bootstrap.rsplit(":", 1)[1])
            env.update(KLINES_STATE_DIR=str(self.state))
            env.setdefault("KAFKA_LIBS_DIR", str(REPO / ".state" / "kafka-libs"))
            subprocess.run([str(KAFKA_SH), "stop"], env=env, capture_output=True, check=False)
            self.say("Kafka broker stopped")

    # -- report -----------------------------------------------------------------------------------------------

    def report(self) -> RunSummary:
        from services.shared import clickhouse

        summary = self.summary()
        ch = self.settings.clickhouse
        client = clickhouse.connect(ch)
        table = f"{ch.database}.{ch.finalized_table}"
        counts = clickhouse.query_rows(
            client,
            f"SELECT symbol, interval, count(), min(open_dt), max(open_dt) FROM {table} FINAL "
            "GROUP BY symbol, interval ORDER BY symbol, interval",
        )
        summary.klines_stored = sum(int(row[2]) for row in counts)
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
        if self.options.verify and self.mode == "replay":
            from services.verify import VerifyError, print_report, verify

            print("", file=self.out)
            try:
                report = verify(self.settings, self.rest_url)
            except VerifyError as exc:
                summary.verify, summary.verify_ok = f"FAILED: {exc}", False
                print(f"verify FAILED: {exc}", file=self.out)
            else:
                print_report(report, out=self.out)
                summary.verify = report.summary().removeprefix("verify ")
                summary.verify_ok = report.ok
        elif self.options.verify:
            summary.verify = "skipped (live market: its first klines are only partly seen)"
        clickhouse.close(ch)
        topic = self.settings.kafka.topics.finalized
        local = REPO / ".venv" / "bin" / "klines"
        klines = self._rel(local) if local.exists() else "klines"
        print(
            f"\nData: Kafka in {self._rel(self.state)}/kafka-* (topics {topic}, ...), ClickHouse in "
            f"{ch.dsn.removeprefix('chdb://')} (database {ch.database}), logs in {self._rel(self.logs)}/\n"
            f"Query it:\n"
            f'  {klines} sql "SELECT * FROM {table} FINAL ORDER BY open_time DESC LIMIT 10"\n'
            f"  {klines} tail {topic} --from-beginning -n 5   (while the broker runs)",
            file=self.out,
        )
        return summary

    def summary(self) -> RunSummary:
        """The figures of the run from the services' last ``/metrics`` and this run's log lines."""
        ingest, aggregator, writers = (self.metrics.get(n, {}) for n in ("ingest", "aggregator", "writers"))
        flushed: dict[str, Any] = {}
        unacknowledged = 0
        logged_loss: dict[str, int] = {}
        for service in self.services:
            for record in service.log_records():
                if record.get("log_type") == "DATA_LOSS":
                    logged_loss[service.name] = logged_loss.get(service.name, 0) + 1
                if service.name == "ingest" and record.get("message") == "flushed":
                    flushed = record
                if service.name == "ingest" and "unacknowledged" in record:
                    unacknowledged += _num(record, "unacknowledged")
        counted = {
            "aggregator": _num(aggregator, "data_loss"),
            "ingest": _num(ingest, "data_loss_events"),
            "writers": _num(writers, "data_loss"),
        }
        # A loss is both counted and logged: count each service's larger figure once.
        data_loss = sum(max(counted.get(n, 0), logged_loss.get(n, 0)) for n in {*counted, *logged_loss})
        published = _num(flushed, "trades_published") if flushed else _num(ingest, "trades_published")
        if self.published_in_topic is not None:  # ingest was restarted: what its topic holds
            published = self.published_in_topic
        held = _num(flushed, "dropped_held") if flushed else _num(ingest, "queue_held")
        return RunSummary(
            mode=self.mode,
            trades_sent=self.exchange_sent if self.mode == "replay" else None,
            trades_published=published if ingest or flushed else None,
            trades_applied=_num(aggregator, "trades_applied") if aggregator else None,
            klines_finalized=_num(aggregator, "klines_finalized") if aggregator else None,
            data_loss=data_loss,
            dead_letters=sum(_num(self.metrics.get(s.name), "dead_letters") for s in self.services),
            held_dropped=held,
            dropped_other=_num(ingest, "trades_dropped_on_remove")
            + unacknowledged
            + _num(aggregator, "dead_letters_dropped"),
            exits=dict(self.exits),
            drain_problems=list(self.drain_problems),
            longest_apply_s=float(aggregator["longest_apply_s"]) if "longest_apply_s" in aggregator else None,
            flow_pauses=_num(aggregator, "flow_pauses"),
            flow_paused_s=float(aggregator.get("flow_paused_s") or 0.0),
        )


async def _uncommitted(settings: KafkaSettings, group_id: str) -> int:
    """Records of the finalized topic beyond ``group_id``'s committed offsets (all of a partition without one)."""
    from aiokafka.admin import AIOKafkaAdminClient

    from services.shared.kafka import end_offsets

    topic = settings.topics.finalized
    ends = await end_offsets(settings, topic)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=settings.request_timeout_ms)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group_id)
    finally:
        await admin.close()
    done = {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == topic}
    return sum(max(0, end - max(0, done.get(partition, 0))) for partition, end in ends.items())


async def _distinct_trades(settings: KafkaSettings) -> int:
    """How many distinct trades (symbol, ``a``) the trades topic holds, read from its beginning to its end."""
    from services.core.models import InvalidInput
    from services.shared.kafka import _end_offsets, make_consumer
    from services.shared.messages import TradeBatch, decode_trades_value

    topic = settings.topics.trades
    consumer = make_consumer(settings, group_id=None, client_suffix="run-count", isolation_level="read_uncommitted")
    await consumer.start()
    seen: dict[str, set[int]] = {}
    try:
        ends = {tp: end for tp, end in (await _end_offsets(consumer, topic)).items() if end > 0}
        consumer.assign(list(ends))
        await consumer.seek_to_beginning(*ends)
        for tp, end in ends.items():
            while await consumer.position(tp) < end:
                batch = await consumer.getmany(tp, timeout_ms=1000, max_records=5000)
                for record in batch.get(tp, []):
                    if record.offset >= end:
                        break
                    try:
                        value = decode_trades_value(record.value, record.key)
                    except InvalidInput:
                        continue  # not a trade record (hand-injected garbage): the aggregator dead-letters it
                    if isinstance(value, TradeBatch):
                        seen.setdefault(value.symbol, set()).update(t.a for t in value.trades)
    finally:
        await consumer.stop()
    return sum(len(ids) for ids in seen.values())


async def _topic_names(settings: Settings) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    kafka = settings.kafka
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap, request_timeout_ms=kafka.request_timeout_ms)
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()


def _listed(symbols: list[str], shown: int = 10) -> str:
    """The symbols, comma-separated; beyond ``shown`` only the first ones and how many more."""
    if len(symbols) <= shown:
        return ",".join(symbols)
    return f"{','.join(symbols[:shown])} and {len(symbols) - shown:,} more"


def _short(value: Any) -> str:
    text = format(value, "f").rstrip("0").rstrip(".") if hasattr(value, "as_tuple") else str(value)
    return text or "0"


def run_pipeline(settings: Settings, options: RunOptions, out: TextIO | None = None) -> int:
    pipeline = LocalPipeline(settings, options, out)
    signals = {"count": 0}

    def on_signal(_signum: int, _frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] == 2:
            pipeline.say("second Ctrl-C: stopping without waiting for the drain")

    pipeline.abort_requested = lambda: signals["count"] >= 2
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 1
    try:
        pipeline.start()
        reason = pipeline.watch(lambda: signals["count"] >= 1)
        pipeline.say(f"stopping: {reason}")
        pipeline.drain_and_stop()
        summary = pipeline.report()
        print("", file=pipeline.out)
        for line in summary.lines():
            print(line, file=pipeline.out)
        code = summary.exit_code
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
    p.description = (
        "Start the whole pipeline locally, stop it with a drain (every trade the exchange sent is published, "
        "aggregated and every finalized kline stored before anything stops), print what is stored and a summary. "
        "The exit status is non-zero when anything was lost (DATA_LOSS, dropped trades, a drain that gave up, a "
        "service that did not stop cleanly, a failed --verify). A replay run (--offline, --file, or Binance not "
        "reachable) is fresh by default: its own topics, consumer groups, aggregator checkpoint and ClickHouse "
        "database <database>_run_<time>_<id>, so runs one after another with other files, symbols or intervals "
        f"need no cleanup; the last {KEEP_RUNS} fresh runs are kept, older ones removed. A live run continues in "
        "the configured topics and database."
    )
    p.add_argument("--offline", action="store_true", help="use the local replay exchange even if Binance answers")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0 = until Ctrl-C)")
    p.add_argument("--until-exhausted", action="store_true", help="stop when the replay has sent everything")
    p.add_argument("--speed", type=float, default=60, help="replay: market time per real time (0 = max)")
    p.add_argument("--market-duration", default="2h", help="replay: generated market length (e.g. 30m, 2h)")
    p.add_argument("--start", default="2026-01-01T00:00:00Z", help="replay: generated market start (UTC)")
    p.add_argument("--seed", type=int, default=1, help="replay: generator seed")
    p.add_argument(
        "--zipf",
        type=float,
        default=None,
        metavar="S",
        help="replay: Zipf activity, the k-th symbol trades 1/k**S as often as the first (default: own profiles)",
    )
    p.add_argument("--file", action="append", default=[], metavar="PATH[:SYMBOL]", help="replay recorded files")
    p.add_argument("--symbols", help="comma-separated symbols (default: market.symbols)")
    p.add_argument("--intervals", help="comma-separated intervals (default: market.intervals)")
    p.add_argument("--venue", choices=["spot", "usdm"], help="default: market.venue")
    p.add_argument("--replay-port", type=int, default=9443)
    p.add_argument("--verify", action="store_true", help="at the end, compare stored klines with the exchange's")
    p.add_argument("--keep-broker", action="store_true", help="leave the broker running at the end")
    p.add_argument(
        "--fresh",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="own topics, groups, checkpoint and ClickHouse database for this run (default: yes for a replay "
        "run, no for a live one); --no-fresh continues in the configured ones",
    )
    p.add_argument(
        "--drain-stall",
        type=float,
        default=60,
        metavar="S",
        help="at the stop, wait for each service to drain as long as it makes progress; give up after S seconds "
        "without (default 60)",
    )
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
        zipf=args.zipf,
        files=args.file,
        symbols=[s.strip().upper() for s in args.symbols.split(",")] if args.symbols else [],
        intervals=[i.strip() for i in args.intervals.split(",")] if args.intervals else [],
        venue=args.venue,
        replay_port=args.replay_port,
        verify=args.verify,
        keep_broker=args.keep_broker,
        fresh=args.fresh,
        drain_stall_s=args.drain_stall,
    )
    return run_pipeline(settings, options)
