"""Liveness that means something: the event loop is turning and every consumer loop is polling.

``/healthz`` used to answer "alive" as long as the process could answer at all, even with its event loop
wedged. It now reports what the process does, judged by :class:`Liveness`:

1. **Heartbeat.** One task per process (:meth:`Liveness.run_heartbeat`, started by
   :class:`~services.shared.lifecycle.HealthServer`) wakes every ``beat_interval_s`` and records the monotonic
   time of its beat and how late the wake-up came (the loop's lag). A loop that runs a long callback, spins,
   or sleeps synchronously cannot beat.
2. **Pollers.** Each loop that must keep turning for the service to do its job registers a :class:`Poller`
   and reports every poll (:meth:`Poller.polled`): each Kafka consumer's fetch (a ``getmany`` that returned or
   raised, see :class:`PollingConsumer`; the aggregator's batch fetch), ingest's tick loop. A poller's
   registration counts as its first report, so a loop gets one bound to start.
3. **Paused on purpose.** A poller may name why it does not poll right now (``paused``: the aggregator
   waiting for its output to drain, a rebalance). The heartbeat asks at every beat, in the event loop, and a
   poller that answers with a reason counts as reported at that beat, with the reason. So a deliberate pause
   is live exactly as long as the loop turns and re-evaluates it; a writer retrying ClickHouse needs no such
   answer: it keeps calling ``getmany`` (its keepalive) while it waits.
4. **Verdict** (:meth:`Liveness.verdict`), first match wins:
   ``wedged`` (503) when the last beat is older than ``loop_stall_s`` (``service.liveness_loop_stall_s``);
   ``stale`` (503) when a poller's last report is older than its bound (``service.liveness_poll_stale_s``);
   else ``alive`` (200). The answer is JSON: ``{"status", "reason", "loop_lag_s", "polled_ago_s": {poller:
   seconds}, "paused": {poller: reason}}``; ``loop_lag_s`` is the last measured lag, or how long the loop has
   now been silent beyond its beat interval when that is larger.

Where ``/healthz`` is answered, and why: a probe answered from the event loop cannot say "wedged": while the
loop is blocked the request waits in the socket's backlog and the probe times out without a reason. So with
``service.liveness_port`` set (Kubernetes sets it), a :class:`LivenessServer` also answers ``GET /healthz`` on
that port from a small thread of its own (stdlib ``http.server``, one request at a time, a 2 s socket timeout),
which judges from the recorded beats and reports with the specific reason while the loop is blocked. Only
``/healthz`` is there: readiness, metrics and the service's own routes (WebSockets, ``POST /symbols``) read
service state that belongs to the loop, so they stay on the service's HTTP port, in the loop (which also keeps
``/healthz``, judged the same way, for compose and people). The thread shares the GIL: a loop stuck in C code
that holds the GIL (an in-process chDB query) stops the thread too, and the probe times out as before.

Thread safety: the loop thread writes, the probe thread reads. Each report (a beat, a poll) is one attribute
holding one immutable tuple, replaced whole, so a reader sees the old report or the new one, never half of one;
the set of pollers changes under a lock and is copied under it. The ``paused`` callables run only in the
loop (by the heartbeat), never in the probe thread: they may read any service state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

log = logging.getLogger(__name__)

#: The heartbeat wakes at most this far apart (less when ``loop_stall_s`` is short: five beats per bound).
MAX_BEAT_INTERVAL_S = 1.0


class Poller:
    """One loop that must keep polling: it calls :meth:`polled` on every poll (cheap: one clock read)."""

    __slots__ = ("_clock", "_report", "bound_s", "name", "paused")

    def __init__(
        self,
        name: str,
        bound_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        paused: Callable[[], str | None] | None = None,
    ) -> None:
        self.name = name
        self.bound_s = bound_s
        self.paused = paused
        self._clock = clock
        self._report: tuple[float, str | None] = (clock(), None)  # (when, why paused or None)

    def polled(self) -> None:
        """The loop polled now."""
        self._report = (self._clock(), None)

    def report(self) -> tuple[float, str | None]:
        """The last report: its monotonic time and, for a pause, its reason."""
        return self._report

    def _reevaluate(self, now: float) -> None:
        """At a beat, in the loop: a poller paused on purpose counts as reported now, with its reason.

        A ``paused`` that raises counts as "not paused" (logged): a bug there must not stop the heartbeat, which
        would report the whole loop wedged.
        """
        if self.paused is not None:
            try:
                reason = self.paused()
            except Exception as exc:
                log.warning("liveness: %s's pause check failed: %s: %s", self.name, type(exc).__name__, exc)
                return
            if reason is not None:
                self._report = (now, reason)


@dataclass(frozen=True)
class Verdict:
    """What ``/healthz`` answers: ``status`` (wedged, stale, alive) with its reason and figures."""

    status: str
    reason: str
    loop_lag_s: float
    polled_ago_s: dict[str, float] = field(default_factory=dict)
    paused: dict[str, str] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.status == "alive"

    @property
    def http_status(self) -> int:
        return 200 if self.alive else 503

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "loop_lag_s": self.loop_lag_s,
            "polled_ago_s": self.polled_ago_s,
            "paused": self.paused,
        }


class Liveness:
    """The heartbeat and the pollers of one process, and the verdict on them (see the module docstring)."""

    def __init__(
        self,
        *,
        loop_stall_s: float = 10.0,
        poll_stale_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if loop_stall_s <= 0 or poll_stale_s <= 0:
            raise ValueError(f"liveness bounds must be positive, got {loop_stall_s=} and {poll_stale_s=}")
        self.loop_stall_s = loop_stall_s
        self.poll_stale_s = poll_stale_s
        self.beat_interval_s = min(MAX_BEAT_INTERVAL_S, loop_stall_s / 5)
        self._clock = clock
        self._beat: tuple[float, float] = (clock(), 0.0)  # (when, the lag measured at that beat)
        self._pollers: dict[str, Poller] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, service: Any, clock: Callable[[], float] = time.monotonic) -> Liveness:
        """From ``settings.service`` (:class:`~services.shared.settings.ServiceSettings`)."""
        return cls(loop_stall_s=service.liveness_loop_stall_s, poll_stale_s=service.liveness_poll_stale_s, clock=clock)

    # --- the loop's side -----------------------------------------------------------------------------------

    def poller(
        self, name: str, *, bound_s: float | None = None, paused: Callable[[], str | None] | None = None
    ) -> Poller:
        """Register the loop ``name`` (its bound: ``poll_stale_s`` unless given); registering counts as a poll."""
        poller = Poller(name, self.poll_stale_s if bound_s is None else bound_s, clock=self._clock, paused=paused)
        with self._lock:
            if name in self._pollers:
                raise ValueError(f"a poller named {name!r} is already registered")
            self._pollers[name] = poller
        return poller

    def forget(self, poller: Poller) -> None:
        """The loop ended on purpose: stop judging it."""
        with self._lock:
            if self._pollers.get(poller.name) is poller:
                del self._pollers[poller.name]

    def observe(self, consumer: Any, name: str) -> PollingConsumer:
        """``consumer`` with every ``getmany`` reported to a new poller ``name``."""
        return PollingConsumer(consumer, self.poller(name))

    def beat(self, lag_s: float = 0.0) -> None:
        """One heartbeat, in the loop: record it and re-evaluate the pollers paused on purpose (step 3)."""
        now = self._clock()
        self._beat = (now, max(0.0, lag_s))
        with self._lock:
            pollers = list(self._pollers.values())
        for poller in pollers:
            poller._reevaluate(now)

    async def run_heartbeat(self) -> None:
        """Beat every ``beat_interval_s`` until cancelled; the lag is how much later than asked the loop woke."""
        interval = self.beat_interval_s
        self.beat()
        while True:
            asked = self._clock() + interval
            await asyncio.sleep(interval)
            self.beat(self._clock() - asked)

    # --- any thread -----------------------------------------------------------------------------------------

    def verdict(self) -> Verdict:
        """The judgement of step 4, from the recorded reports only (safe from any thread)."""
        now = self._clock()
        beat_at, measured_lag = self._beat
        silent = now - beat_at
        lag = round(max(measured_lag, silent - self.beat_interval_s), 3)
        with self._lock:
            pollers = list(self._pollers.values())
        ages: dict[str, float] = {}
        paused: dict[str, str] = {}
        stale: list[str] = []
        for poller in pollers:
            at, why = poller.report()
            age = max(0.0, now - at)
            ages[poller.name] = round(age, 3)
            if why is not None:
                paused[poller.name] = why
            if age > poller.bound_s:
                stale.append(f"{poller.name} has not polled for {age:.1f} s (bound {poller.bound_s:g} s)")
        if silent > self.loop_stall_s:
            reason = f"the event loop has not turned for {silent:.1f} s (bound {self.loop_stall_s:g} s)"
            return Verdict("wedged", reason, lag, ages, paused)
        if stale:
            return Verdict("stale", "; ".join(stale), lag, ages, paused)
        return Verdict("alive", "the event loop turns and every poller polls", lag, ages, paused)

    def loop_lag_s(self) -> float:
        return self.verdict().loop_lag_s

    def poll_ages_s(self) -> dict[str, float]:
        return self.verdict().polled_ago_s


class PollingConsumer:
    """An aiokafka consumer whose every ``getmany`` reports a poll; every other attribute is the consumer's.

    A ``getmany`` that raised counts too: the loop turned (a broker outage is not a wedged process, and a restart
    would not bring the broker back).
    """

    def __init__(self, consumer: Any, poller: Poller) -> None:
        self._consumer = consumer
        self.poller = poller

    async def getmany(self, *partitions: Any, **options: Any) -> Any:
        try:
            return await self._consumer.getmany(*partitions, **options)
        finally:
            self.poller.polled()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


class _Handler(BaseHTTPRequestHandler):
    liveness: Liveness  # set on the subclass each server builds
    timeout = 2.0  # a client that sends nothing cannot hold the one serving thread
    server_version = "klines-liveness"

    def do_GET(self) -> None:  # http.server names it so
        if self.path.partition("?")[0] != "/healthz":
            self._send(404, {"error": "only /healthz is served on the liveness port"})
            return
        verdict = self.liveness.verdict()
        self._send(verdict.http_status, verdict.to_dict())

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # the base class names it so
        pass  # probes every few seconds: no access log


class LivenessServer:
    """``GET /healthz`` on its own port, answered from a thread (see the module docstring for why)."""

    def __init__(self, liveness: Liveness, host: str, port: int) -> None:
        self.liveness = liveness
        self.host = host
        self.port = port
        self._server: HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (an ``OSError`` when the port is taken) and serve from a daemon thread."""
        handler = type("LivenessHandler", (_Handler,), {"liveness": self.liveness})
        server = HTTPServer((self.host, self.port), handler)
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name=f"liveness-{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (waits for the request in progress, at most the handler's timeout) and close the port."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None


async def stop_heartbeat(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
