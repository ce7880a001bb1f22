"""WebSocket connections to Binance's combined aggTrade streams: stream groups, rotation, watchdog, reconnects.

The :class:`ConnectionPool` spreads the wanted symbols over :class:`StreamGroup` s of at most
``max_streams_per_connection`` (Binance: 1024) streams. Each group keeps one connection open
(``{ws_url}/stream?streams=...`` on spot, the routed ``{ws_url}/market/stream?streams=...`` on USD-M futures;
the URL carries at most ``max_url_streams`` names, the rest are subscribed by message) and supervises it:

* **rotation** - before the connection's 24 h limit (``max_connection_age_s``, jittered) and as soon as the
  server announces ``serverShutdown``: open the replacement *first*, wait until it delivers a frame (at most
  ``rotation_overlap_s``), then close the old one. Both deliver meanwhile; the sequencer drops the duplicates
  by ``a``, so the hand-over loses nothing and publishes nothing twice;
* **watchdog** - nothing received for ``stale_after_s`` (no trade, no reply, not even the server's ping, which
  Binance sends every 20 s; time paused by backpressure does not count): the connection is presumed dead or
  stalled and replaced. A quiet market keeps a healthy connection alive through its pings;
* **reconnect** - after a close, error or staleness, with full-jitter exponential backoff capped at
  ``reconnect_cap_s`` (reset once a connection delivers); the sequencer notices the ids missed meanwhile when
  the next frame of the symbol arrives, and ``on_reconnect`` lets the service check the group's symbols by
  REST at once (a symbol that went quiet right after the outage would otherwise hide its hole);
* **subscriptions at run time** - symbols added or removed are ``SUBSCRIBE``/``UNSUBSCRIBE`` d on the live
  connection(s), paced below the venue's control-message limit (spot 5/s, USD-M 10/s); a full group makes
  the pool open a new one;
* **liveness** - with :attr:`ConnectionPool.liveness` set (:mod:`services.shared.liveness`), each group's
  supervisor is a poller (``ingest stream group-N``): every turn of its watch loop (at least every 0.5 s) is a
  poll, and connecting, backing off, subscribing and rotating are pauses with that reason. A supervisor that
  hangs anywhere else stops polling, and ``/healthz`` reports the process stale, naming the group.

Pings: every ping frame goes to the ``websockets`` library, which answers it with a pong at once (it also
sends its own keepalive pings and drops a connection whose pongs stop), so a connection that keeps reading
never misses Binance's 20 s ping / 60 s pong deadline. A connection paused by backpressure reads no pings
either; if the pause outlives the server's patience the server closes it, and the gap is backfilled.

Text frames are handed, undecoded, to a :class:`FrameSink` as the event loop reads them, every complete frame
of a chunk read from the socket in one call (no per-message await, no per-frame generator, no per-frame call
chain: see :class:`_DirectConnection`); the sink validates and sequences them synchronously and says whether
the queue is full, in which case the connection stops reading its socket until the sink has room again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.frames import Frame, Opcode
from websockets.protocol import Event, State

from services.ingest.frames import stream_name
from services.shared.liveness import Liveness, Poller
from services.shared.logs import log_event

log = logging.getLogger("services.ingest.connections")

Venue = Literal["spot", "usdm"]
WatchOutcome = Literal["closed", "stale", "rotate", "server_shutdown", "stopping", "empty"]

CONTROL_MESSAGES_PER_S: dict[str, int] = {"spot": 5, "usdm": 10}
# Silence that means a dead connection: three of the server's ping intervals (spot 20 s, USD-M 3 min).
STALE_AFTER_S: dict[str, float] = {"spot": 60.0, "usdm": 540.0}
SUBSCRIBE_CHUNK = 200


class FrameSink(Protocol):
    """Receives every frame of every connection (synchronously) and applies backpressure."""

    def on_frames(self, raws: list[bytes], conn: StreamConnection) -> bool:
        """Handle frames, in the order received; True when the queue is full and the connection must stop
        reading."""
        ...

    async def wait_for_room(self) -> None:
        """Return once the queue has room again (or the service stops)."""
        ...


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    max_streams_per_connection: int = 1024
    max_url_streams: int = 200
    max_connection_age_s: float = 23 * 3600.0
    age_jitter_s: float = 1800.0
    stale_after_s: float | None = None  # None: the venue's (spot pings every 20 s, USD-M every 3 min)
    rotation_overlap_s: float = 2.0
    reconnect_base_s: float = 0.25
    reconnect_cap_s: float = 30.0
    open_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    control_messages_per_s: int | None = None  # None: the venue's limit


@dataclass(slots=True)
class ConnectionStats:
    opened: int = 0
    reconnects: int = 0
    rotations: int = 0
    server_shutdowns: int = 0
    stale: int = 0
    connect_failures: int = 0
    control_errors: int = 0
    frames: int = 0
    subscribe_messages: int = 0


def stream_base(ws_url: str, venue: Venue) -> str:
    """``{ws_url}/stream`` on spot; the routed ``{ws_url}/market/stream`` on USD-M futures."""
    base = ws_url.rstrip("/")
    if venue == "usdm" and not base.endswith("/market"):
        base += "/market"
    return base + "/stream"


class Backoff:
    """Full-jitter exponential backoff: ``uniform(0, min(cap, base * 2**attempt))``."""

    def __init__(self, base_s: float, cap_s: float, rng: random.Random) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self._rng = rng
        self.attempt = 0

    def next_delay(self) -> float:
        delay = self._rng.uniform(0, min(self.cap_s, self.base_s * 2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return delay

    def reset(self) -> None:
        self.attempt = 0


_TEXT_FIN = 0x81  # first header byte of an unfragmented text frame without extension bits
_MAX_HANDSHAKE_BYTES = 64 * 1024


class _DirectConnection(ClientConnection):
    """websockets' client connection, handing the text messages of each chunk read to ``on_texts``.

    The stock connection parses frames with a generator per frame and queues every message for ``recv()``, a
    chain of awaits per message: at tens of thousands of frames per second that costs more than validating
    the trades. Here:

    * the handshake (the HTTP response) is the library's: bytes up to the end of the response go to it;
    * after it, :meth:`data_received` splits the byte stream into complete frames itself. An unfragmented,
      unmasked text frame (``0x81``, nearly every frame Binance sends) is collected, and the chunk's text frames
      go to ``on_texts`` in one call at the end of the chunk (also with none: every chunk shows the connection
      alive), or before any other frame, so the order of frames is kept. Any other
      complete frame - ping (the library answers it), pong (its keepalive), close, binary, fragments, a frame
      over ``max_size`` or a masked one (both protocol errors the library reports) - is fed to the library
      unchanged and in order. The library therefore only ever sees whole frames and its parser is always at
      a frame boundary; an incomplete frame at the end of a chunk waits here for the rest;
    * messages the library assembles (fragmented ones) reach ``on_texts`` through :meth:`process_event`.

    ``on_texts`` is a class attribute because the library builds the connection itself
    (``connect(create_connection=...)``): one subclass per connection.
    """

    on_texts: Callable[[list[bytes]], None]
    _pending: bytes = b""
    _framing: bool = False

    def data_received(self, data: bytes) -> None:
        if not self._framing:
            self._handshake_received(data)
            return
        buf = self._pending + data if self._pending else data
        n = len(buf)
        pos = 0
        texts: list[bytes] = []
        add_text = texts.append
        limit = self.protocol.max_message_size
        while n - pos >= 2:
            first = buf[pos]
            second = buf[pos + 1]
            length = second & 0x7F
            header = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                header = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                header = 10
            if second & 0x80 or (limit is not None and length > limit):
                # A masked frame or one over max_size: the library fails the connection with the right code.
                self.on_texts(texts)
                self._framing = False
                self._pending = b""
                super().data_received(buf[pos:])
                return
            end = pos + header + length
            if end > n:
                break
            if first == _TEXT_FIN:
                add_text(buf[pos + header : end])
            else:
                if texts:  # the frames before it first: order is kept
                    self.on_texts(texts)
                    texts = []
                    add_text = texts.append
                super().data_received(buf[pos:end])
            pos = end
        self._pending = buf[pos:] if pos < n else b""
        self.on_texts(texts)

    def _handshake_received(self, data: bytes) -> None:
        """Until the handshake is done, bytes go to the library; frames after the response are split here."""
        if self.response is not None:  # framing was given up (protocol error): everything to the library
            super().data_received(data)
            return
        buf = self._pending + data
        end = buf.find(b"\r\n\r\n")
        if end < 0 and len(buf) < _MAX_HANDSHAKE_BYTES:
            self._pending = buf
            return
        head, rest = (buf, b"") if end < 0 else (buf[: end + 4], buf[end + 4 :])
        self._pending = b""
        super().data_received(head)
        if self.response is not None and self.protocol.state is State.OPEN:
            self._framing = True
            if rest:
                self.data_received(rest)
        elif rest:
            super().data_received(rest)

    def eof_received(self) -> None:
        if self._pending:  # an incomplete frame: let the library see it (it reports the abnormal end)
            pending, self._pending = self._pending, b""
            super().data_received(pending)
        super().eof_received()

    def process_event(self, event: Event) -> None:
        if type(event) is Frame and event.opcode in _ASSEMBLED and self.response is not None:
            self._assemble(event)
            return
        super().process_event(event)

    _fragments: list[bytes] | None = None

    def _assemble(self, frame: Frame) -> None:
        """Messages that reach the library: fragmented ones (and any frame the splitter did not take)."""
        if frame.opcode is not Opcode.CONT:
            self._fragments = []
        if self._fragments is None:
            return  # a continuation without a start: the library already reports such protocol errors
        self._fragments.append(bytes(frame.data))
        if frame.fin:
            message, self._fragments = b"".join(self._fragments), None
            self.on_texts([message])


_ASSEMBLED = frozenset({Opcode.TEXT, Opcode.BINARY, Opcode.CONT})


class StreamConnection:
    """One WebSocket connection; frames go to the sink as they are read (see :class:`_DirectConnection`)."""

    def __init__(
        self,
        name: str,
        base_url: str,
        streams: Iterable[str],
        sink: FrameSink,
        *,
        clock: Callable[[], float],
        options: ConnectionOptions,
        control_interval_s: float,
        on_event: Callable[[], None],
        stats: ConnectionStats,
    ) -> None:
        self.name = name
        self.base_url = base_url
        self.sink = sink
        self._clock = clock
        self._options = options
        self._control_interval_s = control_interval_s
        self._on_event = on_event
        self._stats = stats
        ordered = sorted(streams)
        self.url = f"{base_url}?streams={'/'.join(ordered[: options.max_url_streams])}"
        self.subscribed: set[str] = set(ordered[: options.max_url_streams])
        self.ws: ClientConnection | None = None
        self.opened_at = 0.0
        self.last_frame_at = 0.0
        self.frames = 0
        self.paused = False
        self.muted = False
        self.max_age_s = options.max_connection_age_s
        self.server_shutdown = False
        self.close_reason = ""
        self.done = asyncio.Event()
        self.first_frame = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._resumer: asyncio.Task[None] | None = None
        self._next_control_at = 0.0
        self._request_id = 0

    async def open(self) -> None:
        """Connect and start delivering frames; raises on failure (the caller backs off and retries)."""
        opts = self._options
        connection_class = type("DirectConnection", (_DirectConnection,), {"on_texts": self._on_texts})
        self.ws = await connect(
            self.url,
            open_timeout=opts.open_timeout_s,
            ping_interval=opts.ping_interval_s,
            ping_timeout=opts.ping_timeout_s,
            close_timeout=2.0,
            max_size=1 << 22,
            compression=None,
            proxy=None,
            create_connection=connection_class,
        )
        if self.muted:  # muted while connecting (the pool is stopping)
            self.ws.on_texts = _ignore  # type: ignore[attr-defined]
        self.opened_at = self.last_frame_at = self._clock()
        self._watcher = asyncio.create_task(self._watch_close(self.ws), name=f"ws-{self.name}")

    def _on_texts(self, texts: list[bytes]) -> None:
        """Once per chunk read from the socket (a chunk holds up to hundreds of frames), with its text frames."""
        self.last_frame_at = self._clock()
        if not texts:
            return
        count = len(texts)
        self.frames += count
        self._stats.frames += count
        if self.frames == count:
            self.first_frame.set()
        if self.sink.on_frames(texts, self) and not self.paused:
            self._pause()

    def _pause(self) -> None:
        """Backpressure: stop reading; the socket buffers fill and the exchange holds the data."""
        ws = self.ws
        if ws is None or ws.transport.is_closing():
            return
        self.paused = True
        ws.transport.pause_reading()
        self._resumer = asyncio.create_task(self._resume_when_room(ws), name=f"ws-resume-{self.name}")

    async def _resume_when_room(self, ws: ClientConnection) -> None:
        try:
            await self.sink.wait_for_room()
        finally:
            self.paused = False
            self.last_frame_at = self._clock()  # time spent paused is not silence of the exchange
            if not ws.transport.is_closing():
                ws.transport.resume_reading()

    async def _watch_close(self, ws: ClientConnection) -> None:
        try:
            await ws.wait_closed()
            exc = ws.protocol.close_exc
            if ws.close_code in (1000, 1001):
                self.close_reason = f"closed by the server ({ws.close_code} {ws.close_reason})".strip()
            else:
                self.close_reason = f"connection lost: {exc}"
        finally:
            self.done.set()
            self._on_event()

    def on_server_shutdown(self) -> None:
        self.server_shutdown = True
        self._on_event()

    async def sync(self, wanted: set[str]) -> None:
        """Subscribe/unsubscribe so that this connection carries exactly ``wanted``, paced."""
        add = sorted(wanted - self.subscribed)
        remove = sorted(self.subscribed - wanted)
        for method, names in (("UNSUBSCRIBE", remove), ("SUBSCRIBE", add)):
            for i in range(0, len(names), SUBSCRIBE_CHUNK):
                chunk = names[i : i + SUBSCRIBE_CHUNK]
                await self._send_control(method, chunk)
                if method == "SUBSCRIBE":
                    self.subscribed.update(chunk)
                else:
                    self.subscribed.difference_update(chunk)

    async def _send_control(self, method: str, params: list[str]) -> None:
        ws = self.ws
        if ws is None or self.done.is_set():
            raise ConnectionError(f"{self.name} is not open")
        now = self._clock()
        if now < self._next_control_at:
            await asyncio.sleep(self._next_control_at - now)
        self._next_control_at = max(now, self._next_control_at) + self._control_interval_s
        self._request_id += 1
        await ws.send(json.dumps({"method": method, "params": params, "id": self._request_id}))
        self._stats.subscribe_messages += 1

    def mute(self) -> None:
        """From now on no frame reaches the sink (synchronous: the first step of every close)."""
        self.muted = True
        ws = self.ws
        if ws is not None:
            ws.on_texts = _ignore  # type: ignore[attr-defined]

    async def close(self) -> None:
        """Close the connection (no frame reaches the sink afterwards)."""
        self.mute()
        ws = self.ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 3.0)
            if not ws.transport.is_closing():
                ws.transport.abort()
        for task in (self._watcher, self._resumer):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.done.set()


def _ignore(_texts: list[bytes]) -> None:
    """Frames still arriving on a connection being closed (its replacement already delivers them)."""


@dataclass(slots=True)
class StreamGroup:
    """Up to ``capacity`` streams on one supervised connection (two while rotating)."""

    name: str
    capacity: int
    streams: set[str] = field(default_factory=set)
    connection: StreamConnection | None = None
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    changed: bool = False
    stopping: bool = False
    #: Why the supervisor does not watch its connection right now (the liveness poller's pause), or None.
    busy: str | None = None
    poller: Poller | None = None

    @property
    def room(self) -> int:
        return self.capacity - len(self.streams)


class ConnectionPool:
    """Every stream group of one venue; :meth:`update` changes the symbol set at run time."""

    def __init__(
        self,
        ws_url: str,
        venue: Venue,
        sink: FrameSink,
        *,
        clock: Callable[[], float],
        options: ConnectionOptions,
        rng: random.Random | None = None,
        on_reconnect: Callable[[set[str]], None] | None = None,
    ) -> None:
        self.base_url = stream_base(ws_url, venue)
        self._on_reconnect = on_reconnect
        self.venue = venue
        self.sink = sink
        self.options = options
        self._clock = clock
        self._rng = rng or random.Random()
        limit = options.control_messages_per_s or CONTROL_MESSAGES_PER_S[venue]
        # Stay below the limit: the server counts per rolling second, our clock and its may disagree a bit.
        self._control_interval_s = 1.0 / max(0.5, limit * 0.8)
        self.stale_after_s = options.stale_after_s or STALE_AFTER_S[venue]
        self.stats = ConnectionStats()
        self.groups: list[StreamGroup] = []
        # Every connection opened and not yet collected, replacements included (closing one twice is harmless).
        self._live: weakref.WeakSet[StreamConnection] = weakref.WeakSet()
        self._counter = 0
        self._stopping = False
        #: Set by the service once its health server exists: each group's supervisor then is a poller.
        self.liveness: Liveness | None = None

    # ------------------------------------------------------------------ symbols
    @property
    def streams(self) -> set[str]:
        return {s for group in self.groups for s in group.streams}

    def update(self, symbols: Iterable[str]) -> None:
        """Make the pool carry exactly the aggTrade streams of ``symbols``."""
        wanted = {stream_name(s) for s in symbols}
        for group in self.groups:
            gone = group.streams - wanted
            if gone:
                group.streams -= gone
                self._poke(group)
        have = self.streams
        new = sorted(wanted - have)
        for group in self.groups:
            if not new:
                break
            if group.stopping or group.room <= 0 or group.task is None or group.task.done():
                continue
            take, new = new[: group.room], new[group.room :]
            group.streams.update(take)
            self._poke(group)
        while new:
            take, new = new[: self.options.max_streams_per_connection], new[self.options.max_streams_per_connection :]
            self._counter += 1
            group = StreamGroup(f"group-{self._counter}", self.options.max_streams_per_connection, set(take))
            group.task = asyncio.create_task(self._supervise(group), name=group.name)
            self.groups.append(group)
        self.groups = [s for s in self.groups if s.streams or (s.task is not None and not s.task.done())]

    @staticmethod
    def _poke(group: StreamGroup) -> None:
        group.changed = True
        group.wake.set()

    @property
    def connected(self) -> bool:
        """Every group with streams has an open connection."""
        return all(s.connection is not None and not s.connection.done.is_set() for s in self.groups if s.streams)

    @property
    def open_connections(self) -> int:
        return sum(1 for s in self.groups if s.connection is not None and not s.connection.done.is_set())

    async def stop(self) -> None:
        """Close every connection. No frame reaches the sink once this is called (not only once it returns):
        the connections are muted first, then closed concurrently."""
        self._stopping = True
        self._mute_all()
        for group in self.groups:
            group.stopping = True
            group.wake.set()
        tasks = [s.task for s in self.groups if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Every connection still open: the groups' own, and any opened by a supervisor cancelled mid-way.
        await asyncio.gather(*(conn.close() for conn in list(self._live)), return_exceptions=True)

    def _mute_all(self) -> None:
        for conn in list(self._live):
            conn.mute()

    # ------------------------------------------------------------------ supervision
    async def _supervise(self, group: StreamGroup) -> None:
        """Keep the group connected until it is stopped or empty; a bug in one round must not end it."""
        backoff = Backoff(self.options.reconnect_base_s, self.options.reconnect_cap_s, self._rng)
        liveness = self.liveness
        if liveness is not None:
            group.poller = liveness.poller(f"ingest stream {group.name}", paused=lambda: group.busy)
        try:
            while not (self._stopping or group.stopping) and group.streams:
                try:
                    await self._supervise_once(group, backoff)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("supervisor of %s failed; reconnecting", group.name)
                    self.stats.reconnects += 1
                    group.busy = "backing off after a failed round"
                    await asyncio.sleep(backoff.next_delay())
        finally:
            if liveness is not None and group.poller is not None:
                liveness.forget(group.poller)

    async def _supervise_once(self, group: StreamGroup, backoff: Backoff) -> None:
        try:
            conn = await self._connect(group, backoff)
            while conn is not None:
                group.connection = conn
                outcome = await self._watch(group, conn, backoff)
                if outcome in ("stopping", "empty"):
                    await conn.close()
                    return
                if outcome in ("rotate", "server_shutdown"):
                    self.stats.rotations += 1
                    log_event(log, logging.INFO, "rotating connection", group=group.name, cause=outcome)
                    replacement = await self._connect(group, backoff)
                    if replacement is not None:
                        group.busy = "rotating"
                        await self._overlap(conn, replacement)
                    await conn.close()
                    conn = replacement
                    continue
                if outcome == "stale":
                    self.stats.stale += 1
                    reason = f"nothing received for {self.stale_after_s:g} s"
                else:
                    reason = conn.close_reason
                self.stats.reconnects += 1
                log_event(log, logging.WARNING, "reconnecting", group=group.name, cause=outcome, reason=reason)
                await conn.close()
                conn = await self._connect(group, backoff, first_delay=True)
                if conn is not None and self._on_reconnect is not None:
                    self._on_reconnect({name.partition("@")[0].upper() for name in group.streams})
        finally:
            if group.connection is not None:
                await group.connection.close()

    async def _connect(
        self, group: StreamGroup, backoff: Backoff, *, first_delay: bool = False
    ) -> StreamConnection | None:
        delay = backoff.next_delay() if first_delay else 0.0
        group.busy = "connecting"
        while not (self._stopping or group.stopping) and group.streams:
            if delay > 0:
                await asyncio.sleep(delay)
            conn = StreamConnection(
                f"{group.name}#{self.stats.opened + 1}",
                self.base_url,
                group.streams,
                self.sink,
                clock=self._clock,
                options=self.options,
                control_interval_s=self._control_interval_s,
                on_event=group.wake.set,
                stats=self.stats,
            )
            try:
                self._live.add(conn)
                await conn.open()
                self.stats.opened += 1
                # The URL may hold only part of the streams, and the set may have changed while connecting.
                await conn.sync(set(group.streams))
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed, ConnectionError) as exc:
                self.stats.connect_failures += 1
                await conn.close()
                delay = backoff.next_delay()
                log_event(
                    log,
                    logging.WARNING,
                    "connect failed",
                    group=group.name,
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=round(delay, 3),
                )
                continue
            conn.max_age_s = self.options.max_connection_age_s + self._rng.uniform(0, self.options.age_jitter_s)
            return conn
        return None

    async def _watch(self, group: StreamGroup, conn: StreamConnection, backoff: Backoff) -> WatchOutcome:
        stale_after_s = self.stale_after_s
        tick = max(0.01, min(0.5, stale_after_s / 4))
        while True:
            group.busy = None
            if group.poller is not None:
                group.poller.polled()
            if self._stopping or group.stopping:
                return "stopping"
            if not group.streams:
                return "empty"
            if conn.done.is_set():
                return "closed"
            if conn.server_shutdown:
                self.stats.server_shutdowns += 1
                return "server_shutdown"
            now = self._clock()
            if now - conn.opened_at >= conn.max_age_s:
                return "rotate"
            if not conn.paused and now - conn.last_frame_at >= stale_after_s:
                return "stale"
            if conn.frames:
                backoff.reset()
            if group.changed:
                group.changed = False
                try:
                    group.busy = "subscribing"
                    await conn.sync(set(group.streams))
                    continue
                except (ConnectionClosed, ConnectionError) as exc:
                    # The connection is going away; its replacement subscribes to the current set.
                    log_event(log, logging.WARNING, "subscription update failed", group=group.name, error=str(exc))
            group.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await group.wake.wait()

    async def _overlap(self, old: StreamConnection, new: StreamConnection) -> None:
        """Let both connections deliver until the new one has (or the old one is gone, or time is up)."""
        waiters = [asyncio.ensure_future(e.wait()) for e in (new.first_frame, new.done, old.done)]
        try:
            await asyncio.wait(waiters, timeout=self.options.rotation_overlap_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
