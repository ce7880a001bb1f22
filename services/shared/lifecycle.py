"""Process lifecycle shared by the services: signal-driven shutdown, a deadline, and health endpoints.

``Shutdown`` turns SIGTERM/SIGINT into an ``asyncio.Event`` and carries one deadline that bounds every step of
a graceful stop (stop polling, flush, commit, close), so the sum of the steps never exceeds the grace period
the orchestrator gives (compose 10 s, Kubernetes 30 s).

``HealthServer`` serves ``/healthz`` (the process is alive: its event loop turns and its consumers poll, see
:mod:`services.shared.liveness`; also from a thread on ``service.liveness_port`` when that is set),
``/readyz`` (it does its job: connected, assigned, schema checked), ``/metrics`` (the Prometheus text exposition,
see :mod:`services.shared.metrics`) and ``/metrics.json`` (the same figures as one JSON object, for people and the
local runner) on a small aiohttp app.
Its state-changing routes (any method but GET, HEAD and OPTIONS) sit behind one
:class:`~services.shared.admin.AdminGuard`: a bearer token from ``service.admin_token_file``, or loopback only.

``run_service`` is every service's entry point: it parses the command line (``--config`` plus the service's own
flags), loads the settings, sets up logging, installs the SIGTERM/SIGINT handlers of one ``Shutdown``, runs the
service's coroutine and turns how it ended into the process exit code:

====  ==========================================================================================================
code  meaning
====  ==========================================================================================================
0     clean stop: SIGTERM/SIGINT, everything flushed and committed within ``service.shutdown_grace_s``
1     crash: the service failed while running, or a stop could not finish its work in the grace period
2     startup error, one line on stderr naming the setting or server: a bad setting or command line
      (:class:`ConfigInvalid`), Kafka or ClickHouse unreachable (:class:`DependencyUnreachable`), a table
      without the expected schema (:class:`SchemaMismatch`), the gateway's HTTP port taken (:class:`StartupError`)
====  ==========================================================================================================

A service reports a startup error by raising a :class:`StartupError` (each subclass carries its
``exit_code``); the shared checks' own exceptions (:class:`~services.shared.settings.ConfigError`,
:class:`~services.shared.kafka.KafkaUnreachable`, :class:`~services.shared.clickhouse.SchemaError`) are
mapped onto the same classes by :func:`as_startup_error`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from pydantic import SecretStr

from services.shared.admin import SAFE_METHODS, AdminGuard
from services.shared.kafka import KafkaUnreachable
from services.shared.liveness import Liveness, LivenessServer, stop_heartbeat
from services.shared.logs import setup_logging
from services.shared.metrics import LoopHealth, Readiness, ServiceMetrics
from services.shared.settings import ConfigError, Settings, load_settings

#: Exit codes of every service process (see the module docstring).
EXIT_OK = 0
EXIT_CRASH = 1
EXIT_STARTUP = 2


class Shutdown:
    """A stop request (signal or call) plus the monotonic deadline by which the stop must be complete."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self._clock = clock
        self.event = asyncio.Event()
        self._deadline: float | None = None
        self.reason = ""

    def install(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self.request, sig.name)

    def request(self, reason: str = "requested") -> None:
        if not self.event.is_set():
            self.reason = reason
            self._deadline = self._clock() + self.grace_s
            self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def remaining(self) -> float:
        """Seconds left before the deadline (the full grace period while no stop was requested)."""
        if self._deadline is None:
            return self.grace_s
        return max(0.0, self._deadline - self._clock())

    async def wait(self) -> None:
        await self.event.wait()


class Counters:
    """Named monotonically increasing counters and gauges, exported on ``/metrics`` and ``/metrics.json``."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def inc(self, name: str, amount: float = 1) -> None:
        self.values[name] = self.values.get(name, 0) + amount

    def set(self, name: str, value: float) -> None:
        self.values[name] = value

    def get(self, name: str) -> float:
        return self.values.get(name, 0)

    def snapshot(self) -> dict[str, float]:
        return dict(self.values)


class HealthServer:
    """``/healthz``, ``/readyz``, ``/metrics`` and ``/metrics.json`` (plus any extra routes) for one service process.

    ``metrics()`` is the service's figures as a dict (``/metrics.json``); ``exporter`` turns the same figures into
    Prometheus families for ``/metrics``, next to ``klines_service_ready`` and the process's own
    (``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ``python_gc_*``).

    A route in ``routes`` that changes state (POST, PUT, PATCH, DELETE) needs ``Authorization: Bearer
    <admin_token>`` (the content of ``service.admin_token_file``); without a token it is served only when
    ``host`` is loopback (see :mod:`services.shared.admin`). Refusals are counted as ``admin_auth_failures``.

    ``liveness`` is the process's :class:`~services.shared.liveness.Liveness` (the service registers its pollers
    on it; default: one with the default bounds): :meth:`start` starts its heartbeat and, when ``liveness_port``
    is not None (0: any free port), the thread that answers ``/healthz`` on that port while the loop is blocked.
    ``/metrics`` exports its loop lag and poll ages (``klines_service_loop_lag_seconds``,
    ``klines_service_poll_age_seconds``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ready: Callable[[], bool],
        metrics: Callable[[], Mapping[str, Any]],
        exporter: ServiceMetrics,
        routes: list[web.RouteDef] | None = None,
        admin_token: SecretStr | None = None,
        liveness: Liveness | None = None,
        liveness_port: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self.liveness = liveness if liveness is not None else Liveness()
        self.liveness_port = liveness_port
        self._liveness_server: LivenessServer | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.admin = AdminGuard(host, admin_token)
        guarded = [r for r in routes or [] if r.method.upper() not in SAFE_METHODS]
        self._metrics = metrics if not guarded else self._with_admin_figures(metrics)
        # A registry per server, not the process-wide default: tests run several services in one process.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(exporter)
        self.registry.register(Readiness(exporter.service, ready))
        self.registry.register(LoopHealth(exporter.service, self.liveness.verdict))
        if guarded:
            self.registry.register(
                ServiceMetrics(exporter.service, self._admin_figures, counters={"admin_auth_failures"})
            )
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._app = web.Application()
        self._app.add_routes(
            [
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                web.get("/metrics", make_aiohttp_handler(self.registry, disable_compression=True)),
                web.get("/metrics.json", self._metrics_json),
            ]
            + [
                web.RouteDef(r.method, r.path, self.admin.wrap(r.handler), r.kwargs)
                if r.method.upper() not in SAFE_METHODS
                else r
                for r in routes or []
            ]
        )
        self._runner: web.AppRunner | None = None

    def _admin_figures(self) -> dict[str, int]:
        return {"admin_auth_failures": self.admin.failures}

    def _with_admin_figures(self, metrics: Callable[[], Mapping[str, Any]]) -> Callable[[], Mapping[str, Any]]:
        return lambda: {**metrics(), **self._admin_figures()}

    async def _healthz(self, _request: web.Request) -> web.Response:
        verdict = self.liveness.verdict()
        return web.json_response(verdict.to_dict(), status=verdict.http_status)

    async def _readyz(self, _request: web.Request) -> web.Response:
        ok = self._ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def _metrics_json(self, _request: web.Request) -> web.Response:
        return web.json_response(dict(self._metrics()))

    async def start(self) -> None:
        """Serve the routes, start the heartbeat and, with ``liveness_port``, the liveness thread.

        Raises ``OSError`` when the HTTP port is taken, :class:`StartupError` when the liveness port is; nothing
        is left running then.
        """
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        try:
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
            if self.liveness_port is not None:
                self._liveness_server = LivenessServer(self.liveness, self.host, self.liveness_port)
                try:
                    self._liveness_server.start()
                except OSError as exc:
                    self._liveness_server = None
                    raise StartupError(
                        f"cannot listen on {self.host}:{self.liveness_port} "
                        f"(service.http_host, service.liveness_port): {exc.strerror or exc}"
                    ) from None
                self.liveness_port = self._liveness_server.port
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        if self.port == 0:
            server: Any = site._server
            self.port = int(server.sockets[0].getsockname()[1])
        self._heartbeat = asyncio.create_task(self.liveness.run_heartbeat(), name="liveness-heartbeat")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await stop_heartbeat(self._heartbeat)
        self._heartbeat = None
        if self._liveness_server is not None:
            await asyncio.to_thread(self._liveness_server.stop)
            self._liveness_server = None


class StartupError(Exception):
    """The service cannot start; ``str(error)`` is one line naming the setting or server to fix."""

    exit_code = EXIT_STARTUP


class ConfigInvalid(StartupError):
    """A setting (or the command line) is wrong or names something missing."""


class DependencyUnreachable(StartupError):
    """A server the service needs (Kafka, ClickHouse) does not answer within a bounded time."""


class SchemaMismatch(StartupError):
    """A table is missing or lacks what the service relies on (``klines schema apply`` creates it)."""


def as_startup_error(exc: BaseException) -> StartupError | None:
    """``exc`` as a :class:`StartupError` when it is one of the shared startup checks' exceptions, else None."""
    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, ConfigError):
        return ConfigInvalid(str(exc))
    if isinstance(exc, KafkaUnreachable):
        return DependencyUnreachable(str(exc))
    clickhouse = sys.modules.get("services.shared.clickhouse")  # only a process that loaded it can raise these
    if clickhouse is not None and isinstance(exc, clickhouse.SchemaError):
        return SchemaMismatch(str(exc))
    return None


#: A service's body: runs until ``shutdown`` is requested (or it fails) and returns 0 or 1. It may raise a
#: :class:`StartupError` (or a shared check's exception, see :func:`as_startup_error`) before it starts.
ServiceMain = Callable[[Settings, Shutdown, argparse.Namespace], Awaitable[int]]


def run_service(
    name: str,
    service: ServiceMain,
    *,
    description: str,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
    prog: str | None = None,
) -> int:
    """Run one service process from its command line to its exit code (0, 1 or 2: see the module docstring).

    ``name`` is the log component and the prefix of the one-line startup error on stderr; ``arguments`` adds the
    service's own flags next to ``--config``; ``service`` gets the settings, the installed :class:`Shutdown`
    and the parsed arguments. A usage error on the command line exits 2 (argparse's own convention).
    """
    parser = argparse.ArgumentParser(prog=prog or f"python -m services.{name}", description=description)
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML settings file (default: $KLINES_CONFIG or config/klines.toml)"
    )
    if arguments is not None:
        arguments(parser)
    args = parser.parse_args(argv)
    logged = False
    try:
        settings = load_settings(args.config)
        setup_logging(name, settings.service.log_level, settings.service.log_format)
        logged = True
        return asyncio.run(_serve(service, settings, args))
    except Exception as exc:
        startup = as_startup_error(exc)
        if startup is not None:
            print(f"{name}: {startup}", file=sys.stderr, flush=True)
            return startup.exit_code
        if logged:
            logging.getLogger(f"services.{name}").critical(
                f"{name} failed", exc_info=exc, extra={"error": f"{type(exc).__name__}: {exc}"[:500]}
            )
        else:
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_CRASH


async def _serve(service: ServiceMain, settings: Settings, args: argparse.Namespace) -> int:
    shutdown = Shutdown(settings.service.shutdown_grace_s)
    shutdown.install()
    return await service(settings, shutdown, args)
