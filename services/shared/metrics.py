"""Prometheus export of a service's figures, built at scrape time so the hot paths never touch a metrics library.

Every service already keeps its figures as plain ints and floats and reports them as one dict (served as JSON on
``/metrics.json``). :class:`ServiceMetrics` is a ``prometheus_client`` collector that turns that dict into metric
families when Prometheus scrapes ``/metrics``; the exposition itself is ``prometheus_client``'s. The rules:

* every family is named ``klines_<service>_<key>``;
* a number is a **counter** (``_total``) when the service lists its key as one, else a **gauge** (the safe
  default: a gauge read as a counter would turn every decrease into a reset); ``True``/``False`` are 1/0;
* a dict under a key the service names in ``labels`` becomes labels: ``{"writers": "writer"}`` turns
  ``writers[finalized_writer][rows_inserted]`` into
  ``klines_writers_rows_inserted_total{writer="finalized_writer"}``, and ``{"read_offsets": "partition"}`` turns
  ``read_offsets[3]`` into ``klines_aggregator_read_offsets{partition="3"}``.
  A top-level figure that also exists under such labels is left out (it is their sum or worst: PromQL's ``sum``
  and ``max`` give it back);
* a list is exported as its length (``partitions`` owned), ``None`` (not known yet) and text are left out;
* ``ready`` is left out: :class:`~services.shared.lifecycle.HealthServer` exports ``klines_service_ready``, the
  same answer as ``/readyz``, under one name for every service.

Distributions are real histograms: :class:`Distribution` is a fixed-bucket counter that the code observes where
the event happens (a ``bisect`` and two additions, no lock: each service observes from its event loop), and
:class:`ServiceMetrics` exports it as a ``prometheus_client`` histogram family.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Collection, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

PREFIX = "klines"


#: Buckets (milliseconds) of a closed kline's latency from its interval's end: to acknowledged by the broker
#: (aggregator), to stored in ClickHouse (writers).
CLOSE_LATENCY_MS_BUCKETS = (
    50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 3_600_000
)  # fmt: skip


class Distribution:
    """Counts of observations per bucket plus their sum, for one histogram series.

    ``bounds`` are the buckets' upper bounds (inclusive, as Prometheus' ``le``) in the unit the code observes;
    ``scale`` converts that unit to the exported one (milliseconds observed, seconds exported: ``0.001``), so
    the hot path observes the integers it already has.
    """

    __slots__ = ("bounds", "counts", "scale", "sum")

    def __init__(self, bounds: Sequence[float], *, scale: float = 1.0) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"bucket bounds must be increasing and distinct, got {list(bounds)}")
        self.bounds = tuple(bounds)
        self.scale = scale
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Record ``value`` (``times`` observations of it)."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs in the exported unit, ending with ``+Inf``."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            le = round(bound * self.scale, 12)  # 0.001 * 3 is 0.003, not 0.0030000000000000001
            out.append((floatToGoString(le), running))  # type: ignore[no-untyped-call]  # untyped upstream
        out.append(("+Inf", running + self.counts[-1]))
        return out


@dataclass(frozen=True, slots=True)
class Observed:
    """One histogram series to export: family ``name`` (without the service prefix), its labels, its counts."""

    name: str
    help: str
    labels: Mapping[str, str]
    distribution: Distribution


class AllExcept:
    """A container holding every name but ``excluded``: for a service whose figures are counters unless named."""

    def __init__(self, excluded: Collection[str]) -> None:
        self._excluded = frozenset(excluded)

    def __contains__(self, name: object) -> bool:
        return name not in self._excluded


class ServiceMetrics(Collector):
    """A collector turning ``figures()`` (the service's ``/metrics.json`` dict) into Prometheus families.

    ``counters`` holds the keys that only ever increase; ``labels`` maps a key whose value is a dict to the
    label its keys become; ``histograms()`` yields the service's :class:`Observed` distributions.
    """

    def __init__(
        self,
        service: str,
        figures: Callable[[], Mapping[str, Any]],
        *,
        counters: Container[str] = frozenset(),
        labels: Mapping[str, str] | None = None,
        histograms: Callable[[], Iterable[Observed]] | None = None,
    ) -> None:
        if not service.isidentifier():
            raise ValueError(f"service name {service!r} cannot be part of a metric name")
        self.service = service
        self.prefix = f"{PREFIX}_{service}"
        self._figures = figures
        self._counters = counters
        self._labels = dict(labels or {})
        self._histograms = histograms

    def collect(self) -> Iterator[Metric]:
        figures = self._figures()
        families: dict[str, Metric] = {}
        labelled: set[str] = set()
        for key, label in self._labels.items():
            nested = figures.get(key)
            if not isinstance(nested, Mapping):
                continue
            for outer, value in nested.items():
                if isinstance(value, Mapping):
                    for name, inner in value.items():
                        self._add(families, name, (label,), (str(outer),), inner)
                        labelled.add(name)
                else:
                    self._add(families, key, (label,), (str(outer),), value)
        for name, value in figures.items():
            if name == "ready" or name in labelled or name in self._labels:
                continue
            self._add(families, name, (), (), value)
        yield from families.values()
        if self._histograms is not None:
            yield from self._histogram_families(self._histograms())

    def _add(
        self, families: dict[str, Metric], name: str, labelnames: Sequence[str], labelvalues: Sequence[str], value: Any
    ) -> None:
        number = _number(value)
        if number is None:
            return
        family = families.get(name)
        if family is None:
            full = f"{self.prefix}_{name}"
            documentation = f"{self.service} figure {name!r} (see /metrics.json)"
            if name in self._counters:
                family = CounterMetricFamily(full, documentation, labels=labelnames)
            else:
                family = GaugeMetricFamily(full, documentation, labels=labelnames)
            families[name] = family
        family.add_metric(labelvalues, number)  # type: ignore[attr-defined]  # both family kinds have it

    def _histogram_families(self, observed: Iterable[Observed]) -> Iterator[Metric]:
        families: dict[str, HistogramMetricFamily] = {}
        for item in observed:
            family = families.get(item.name)
            if family is None:
                family = HistogramMetricFamily(f"{self.prefix}_{item.name}", item.help, labels=list(item.labels))
                families[item.name] = family
            dist = item.distribution
            family.add_metric(list(item.labels.values()), dist.buckets(), dist.sum * dist.scale)
        yield from families.values()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families depend on what the service has seen: described by collect() at each scrape


class Readiness(Collector):
    """``klines_service_ready{service=...}``: 1 while the service answers ``/readyz`` with 200, else 0."""

    def __init__(self, service: str, ready: Callable[[], bool]) -> None:
        self.service = service
        self._ready = ready

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            f"{PREFIX}_service_ready", "1 while the service is ready (/readyz answers 200)", labels=["service"]
        )
        family.add_metric([self.service], 1.0 if self._ready() else 0.0)
        yield family

    def describe(self) -> Iterator[Metric]:
        return self.collect()


class LoopHealth(Collector):
    """The liveness figures of :mod:`services.shared.liveness`, for every service under the same names:
    ``klines_service_loop_lag_seconds{service=...}`` (how late the heartbeat woke, or how long the loop has been
    silent) and ``klines_service_poll_age_seconds{service=...,poller=...}`` (since each loop's last poll).

    ``verdict()`` returns an object with ``loop_lag_s`` and ``polled_ago_s`` (a :class:`Verdict
    <services.shared.liveness.Verdict>`).
    """

    def __init__(self, service: str, verdict: Callable[[], Any]) -> None:
        self.service = service
        self._verdict = verdict

    def collect(self) -> Iterator[Metric]:
        verdict = self._verdict()
        lag = GaugeMetricFamily(
            f"{PREFIX}_service_loop_lag_seconds",
            "Seconds the event loop's heartbeat came late (or has been silent beyond its interval)",
            labels=["service"],
        )
        lag.add_metric([self.service], float(verdict.loop_lag_s))
        yield lag
        ages = GaugeMetricFamily(
            f"{PREFIX}_service_poll_age_seconds",
            "Seconds since each consumer loop last polled (or re-evaluated a deliberate pause)",
            labels=["service", "poller"],
        )
        for poller, age in sorted(verdict.polled_ago_s.items()):
            ages.add_metric([self.service, poller], float(age))
        yield ages

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple | set | frozenset):
        return float(len(value))
    return None
