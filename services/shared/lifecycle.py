"""Process lifecycle shared by the services: signal-driven shutdown, a deadline, and health endpoints.

``Shutdown`` turns SIGTERM/SIGINT into an ``asyncio.Event`` and carries one deadline that bounds every step of
a graceful stop (stop polling, flush, commit, close), so the sum of the steps never exceeds the grace period
the orchestrator gives (compose 10 s, Kubernetes 30 s).

``HealthServer`` serves ``/healthz`` (the process is alive), ``/readyz`` (it does its job: connected, assigned,
schema checked), ``/metrics`` (the Prometheus text exposition, see :mod:`services.shared.metrics`) and
``/metrics.json`` (the same figures as one JSON object, for people and the local runner) on a small aiohttp app.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from services.shared.metrics import Readiness, ServiceMetrics


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
    ) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._metrics = metrics
        # A registry per server, not the process-wide default: tests run several services in one process.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(exporter)
        self.registry.register(Readiness(exporter.service, ready))
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
            + (routes or [])
        )
        self._runner: web.AppRunner | None = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        ok = self._ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def _metrics_json(self, _request: web.Request) -> web.Response:
        return web.json_response(dict(self._metrics()))

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            server: Any = site._server
            self.port = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
