"""Per-client send queue that coalesces per kline, and the incoming-message rate limit. Pure code, no I/O.

The feed never waits for a client: it offers each update to every subscriber's :class:`Outbox` and moves on.
An outbox holds at most one pending message per *slot* (stream and open time): a newer update of the same
kline replaces the pending one in place (latest wins, counted as coalesced) and keeps the slot's place in the
queue and its enqueue time, so the age of the oldest slot says how far behind the client is. A new open time
gets a new slot, so a slow client still receives every kline's final values, only fewer intermediate ones.
Control replies get slots of their own and are never coalesced.

The outbox never grows past ``capacity``: an offer that would need one more slot reports overflow, and the
caller disconnects the client; so does a client whose oldest slot is older than the slow-client timeout.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import Enum


class Offer(Enum):
    QUEUED = "queued"
    COALESCED = "coalesced"
    OVERFLOW = "overflow"


@dataclass(slots=True)
class _Slot:
    text: str
    enqueued_at: float
    origin_ms: int


class Outbox:
    """Bounded FIFO of slots keyed by ``(stream, open time)``; see the module docstring."""

    def __init__(self, capacity: int, clock: Callable[[], float]) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._clock = clock
        self._slots: OrderedDict[Hashable, _Slot] = OrderedDict()
        self._control = 0

    def __len__(self) -> int:
        return len(self._slots)

    def offer(self, slot: Hashable, text: str, origin_ms: int = 0) -> Offer:
        """Queue ``text`` in ``slot``, replacing a pending message of the same slot."""
        pending = self._slots.get(slot)
        if pending is not None:
            pending.text = text
            pending.origin_ms = origin_ms
            return Offer.COALESCED
        if len(self._slots) >= self.capacity:
            return Offer.OVERFLOW
        self._slots[slot] = _Slot(text, self._clock(), origin_ms)
        return Offer.QUEUED

    def offer_control(self, text: str) -> Offer:
        """Queue a reply in a slot of its own (never coalesced)."""
        self._control += 1
        return self.offer(("control", self._control), text)

    def pop(self) -> tuple[str, int, float] | None:
        """The oldest pending message, its origin timestamp (ms) and how long its slot waited (s); None if empty."""
        if not self._slots:
            return None
        _slot, pending = self._slots.popitem(last=False)
        return pending.text, pending.origin_ms, self._clock() - pending.enqueued_at

    def oldest_age(self) -> float:
        """Seconds the oldest pending slot has waited (0 when empty)."""
        if not self._slots:
            return 0.0
        first = next(iter(self._slots.values()))
        return self._clock() - first.enqueued_at

    def clear(self) -> int:
        """Drop everything pending; return how many messages were dropped."""
        dropped = len(self._slots)
        self._slots.clear()
        return dropped


class TokenBucket:
    """At most ``rate`` events per second on average, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got rate={rate} burst={burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
