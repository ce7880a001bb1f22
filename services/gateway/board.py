"""The latest kline per ``symbol|interval`` and the decision whether an update is news. Pure code, no I/O.

Updates come from two topics (in-progress snapshots, finalized klines) and a read-back at start, so they are
not in one order: the final of minute 10 may arrive after the first snapshot of minute 11, and a snapshot may
arrive after the final of its own minute. :meth:`KlineBoard.apply` keeps, per key:

* ``current``: the newest kline by open time; among updates of one open time a final beats any snapshot, a
  higher ``version`` beats a lower one (a correction), a higher snapshot ``seq`` beats a lower one;
* ``last_final``: the newest finalized kline, and optionally a ring of the last ``recent_klines`` of them
  (history from memory when ClickHouse is not readable).

It answers True when the update must go to subscribers: every snapshot newer than what is known, every final
not seen before (even one older than ``current``: clients need the close of minute 10 after minute 11 began),
and corrections (a higher version) of older finals. Duplicates and stale snapshots answer False.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Update:
    """One kline as it goes out: its identity, ordering fields and the encoded Binance event."""

    stream: str  # Binance stream name, e.g. btcusdt@kline_1m
    key: str  # topic key, e.g. BTCUSDT|1m
    t: int  # open time, ms
    final: bool
    version: int
    seq: int | None  # snapshot sequence (None for finals)
    event: str  # the Binance kline event, JSON
    origin_ms: int  # Kafka record timestamp (0 for history read from ClickHouse)


@dataclass(slots=True)
class _KeyState:
    current: Update | None = None
    last_final: Update | None = None
    recent: deque[Update] | None = None


class KlineBoard:
    """Latest state per key; see the module docstring for the rules."""

    def __init__(self, recent_klines: int = 0) -> None:
        self.recent_klines = recent_klines
        self._states: dict[str, _KeyState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def keys(self) -> Iterable[str]:
        return self._states.keys()

    def current(self, key: str) -> Update | None:
        state = self._states.get(key)
        return None if state is None else state.current

    def last_final(self, key: str) -> Update | None:
        state = self._states.get(key)
        return None if state is None else state.last_final

    def recent(self, key: str) -> list[Update]:
        state = self._states.get(key)
        return [] if state is None or state.recent is None else list(state.recent)

    def apply(self, update: Update) -> bool:
        """Record ``update``; True when subscribers must receive it."""
        state = self._states.get(update.key)
        if state is None:
            state = self._states[update.key] = _KeyState(
                recent=deque(maxlen=self.recent_klines) if self.recent_klines else None
            )
        if update.final:
            return self._apply_final(state, update)
        return self._apply_snapshot(state, update)

    def _apply_final(self, state: _KeyState, update: Update) -> bool:
        last = state.last_final
        if last is not None and update.t < last.t:
            # An older kline: news only as a correction (a higher version than the ring knows, if it knows it).
            if update.version == 0:
                return False
            if state.recent is not None:
                for index, known in enumerate(state.recent):
                    if known.t == update.t:
                        if known.version >= update.version:
                            return False
                        state.recent[index] = update
                        break
            return True
        if last is not None and update.t == last.t:
            if update.version <= last.version:
                return False
            if state.recent is not None and state.recent and state.recent[-1].t == update.t:
                state.recent[-1] = update
        elif state.recent is not None:
            state.recent.append(update)
        state.last_final = update
        if state.current is None or update.t >= state.current.t:
            state.current = update
        return True

    def _apply_snapshot(self, state: _KeyState, update: Update) -> bool:
        current = state.current
        if current is not None:
            if update.t < current.t:
                return False
            if update.t == current.t:
                if current.final:
                    return False
                if current.seq is not None and update.seq is not None and update.seq <= current.seq:
                    return False
        if state.last_final is not None and update.t <= state.last_final.t:
            return False
        state.current = update
        return True


def merge_for_subscribe(history: Iterable[Update], board: KlineBoard, key: str) -> list[Update]:
    """What a new subscriber receives, oldest first: ``history``, then what the board knows newer than it.

    History read from ClickHouse may lag the topic (the writer flushes every second), so the board's last final
    and current kline are merged in; one message per open time, the most advanced one winning.
    """
    by_time: dict[int, Update] = {}
    candidates = list(history)
    for extra in (board.last_final(key), board.current(key)):
        if extra is not None:
            candidates.append(extra)
    for update in candidates:
        known = by_time.get(update.t)
        if known is None or _rank(update) > _rank(known):
            by_time[update.t] = update
    return [by_time[t] for t in sorted(by_time)]


def _rank(update: Update) -> tuple[bool, int, int]:
    return (update.final, update.version, update.seq or 0)
