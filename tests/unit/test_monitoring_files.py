"""deploy/monitoring/ asks only for what the services export.

The exported names are not listed here: they come from the services' own collectors, scraped with representative
figures (each service's real ``metrics()`` on a freshly built, idle instance, and a writer that stored one batch).
Every metric name in the Grafana dashboard's queries and the alert rules must be among them, with the label
values the queries select on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.samples import Sample

from services.aggregator.clock import ManualClock
from services.aggregator.engine import Aggregator
from services.aggregator.worker import aggregator_exporter
from services.core.models import REASON_CATEGORIES, Kline
from services.finalized_writer import finalized_spec
from services.gateway.server import Gateway
from services.ingest.service import IngestService, IngestTuning
from services.shared.lifecycle import Counters, Shutdown
from services.shared.liveness import Liveness
from services.shared.metrics import LoopHealth, Readiness, ServiceMetrics
from services.shared.settings import Settings, load_settings
from services.snapshot_writer import snapshot_spec
from services.writers.engine import WriterEngine
from services.writers.service import writers_exporter

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "klines-dashboard.json"
ALERTS = MONITORING / "alerts.yaml"
#: A selector in PromQL: a metric name and, optionally, its label matchers.
SELECTOR = re.compile(r"\b((?:klines|process|python)_[a-zA-Z0-9_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


class _Placeholder:
    """Stands for a producer, consumer or reader the idle engines never call."""

    def assignment(self) -> set[Any]:
        return set()

    async def commit(self, offsets: Any = None) -> None:
        return None


class _Feed:
    """The gateway's feed once it has read back: live, nothing behind."""

    records_in = 0
    lag = 0
    ready = True


def _writer(settings: Settings, kind: str) -> WriterEngine:
    spec = finalized_spec(settings) if kind == "finalized" else snapshot_spec(settings)
    return WriterEngine(
        spec,
        _Placeholder(),
        insert=lambda rows, token: None,
        dead_letters=_Placeholder(),  # type: ignore[arg-type]
        shutdown=Shutdown(1.0),
        wall_ms=lambda: 1_700_000_100_000,
    )


def _exporters(settings: Settings) -> Iterator[ServiceMetrics]:
    placeholder: Any = _Placeholder()
    aggregator = Aggregator(
        trades_topic="trades",
        finalized_topic="finalized",
        snapshots_topic="snapshots",
        dead_letter_topic="dead",
        checkpoint_topic="checkpoints",
        intervals=("1m",),
        grace_ms=0,
        clock=ManualClock(),
        finalized=placeholder,
        snapshots=placeholder,
        checkpoints=placeholder,
        reader=placeholder,
        flush_timeout_s=0.1,
        max_in_flight=10,
    )
    aggregator.attach(placeholder)  # in a group (with no partition yet): its lag is known, 0
    yield aggregator_exporter(aggregator)
    yield IngestService(settings, IngestTuning()).exporter()
    gateway = Gateway(settings, Counters(), source="memory")
    gateway.feed = _Feed()  # type: ignore[assignment]
    yield gateway.exporter()
    finalized, snapshot = _writer(settings, "finalized"), _writer(settings, "snapshot")
    one = Decimal(1)
    kline = Kline("BTCUSDT", "1m", 1_700_000_040_000, 1_700_000_099_999, 1, 2, one, one, one, one, one, 2, True,
                  one, one, one, 1, "repaired")  # fmt: skip
    finalized._observe_stored([(0, 0, kline, 1, "")])  # one stored correction: the close -> stored histogram
    yield writers_exporter([finalized, snapshot])


@pytest.fixture(scope="module")
def exported() -> list[Sample]:
    """Every sample the four services' ``/metrics`` would carry (plus readiness, liveness and the process's
    own)."""
    settings = load_settings(REPO / "config" / "klines.toml")
    registries = []
    for exporter in _exporters(settings):  # one registry per service, as each HealthServer has
        registry = CollectorRegistry(auto_describe=False)
        registry.register(exporter)
        registry.register(Readiness(exporter.service, lambda: True))
        liveness = Liveness.from_settings(settings.service)
        liveness.poller(f"{exporter.service} consumer")
        registry.register(LoopHealth(exporter.service, liveness.verdict))  # as HealthServer registers it
        ProcessCollector(registry=registry)
        registries.append(registry)
    texts = [generate_latest(registry).decode() for registry in registries]
    return [sample for text in texts for family in text_string_to_metric_families(text) for sample in family.samples]


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _assert_exported(query: str, exported: list[Sample]) -> int:
    found = 0
    for match in SELECTOR.finditer(query):
        name, matchers = match.group(1), match.group(2) or ""
        samples = [s for s in exported if s.name == name]
        assert samples, f"{name} (in {query!r}) is not exported by any service"
        for label, value in MATCHER.findall(matchers):
            assert any(s.labels.get(label) == value for s in samples), f"no {name}{{{label}={value!r}}} exported"
        found += 1
    return found


def test_the_exported_families_cover_each_service(exported: list[Sample]) -> None:
    services = {s.labels["service"] for s in exported if s.name == "klines_service_ready"}
    assert services == {"ingest", "aggregator", "writers", "gateway"}
    names = {s.name for s in exported}
    for name in (
        "klines_writers_close_to_stored_seconds_bucket",
        "klines_writers_insert_duration_seconds_bucket",
        "klines_writers_corrections_total",
        "klines_gateway_delivery_latency_seconds_bucket",
        "klines_aggregator_data_loss_total",
        "klines_ingest_data_loss_events_total",
        "klines_ingest_dead_letters_by_reason_total",
        "klines_aggregator_dead_letters_by_reason_total",
        "klines_writers_dead_letters_by_reason_total",
    ):
        assert name in names, name


@pytest.mark.parametrize("service", ["ingest", "aggregator", "writers"])
def test_dead_letters_are_counted_by_reason_category_from_the_start(service: str, exported: list[Sample]) -> None:
    """Every category is a series at 0 before the first dead letter (a counter first seen at 1 would hide that
    increase from ``rate``), under the one label ``reason``."""
    samples = [s for s in exported if s.name == f"klines_{service}_dead_letters_by_reason_total"]
    assert sorted(s.labels["reason"] for s in samples) == sorted(REASON_CATEGORIES)
    assert all(set(s.labels) == {"reason"} and s.value == 0 for s in samples), samples


def test_the_dead_letter_panel_shows_each_service_by_reason() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (panel,) = [panel for panel in dashboard["panels"] if panel["title"] == "Dead letters/s"]
    queries = [target["expr"] for target in panel["targets"]]
    for service in ("ingest", "aggregator", "writers"):
        (query,) = [q for q in queries if f"klines_{service}_dead_letters_by_reason_total" in q]
        assert "by (reason)" in query, query


def test_every_dashboard_query_asks_for_exported_metrics(exported: list[Sample]) -> None:
    queries = _dashboard_queries()
    assert len(queries) >= 10
    for query in queries:
        assert _assert_exported(query, exported) >= 1, f"{query!r} names no klines metric"


def test_every_alert_rule_asks_for_exported_metrics(exported: list[Sample]) -> None:
    rules = _alert_rules()
    assert {r["alert"] for r in rules} >= {
        "KlinesDataLoss",
        "KlinesAggregatorLagGrowing",
        "KlinesWriterLagGrowing",
        "KlinesNoFinalizedKline",
        "KlinesInsertRetriesRising",
        "KlinesServiceNotReady",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert _assert_exported(rule["expr"], exported) >= 1, rule["alert"]


def test_the_prometheus_rule_object_carries_the_same_rules() -> None:
    rule_object = yaml.safe_load((MONITORING / "k8s" / "prometheusrule.yaml").read_text())
    assert rule_object["kind"] == "PrometheusRule"
    assert rule_object["spec"] == yaml.safe_load(ALERTS.read_text())


def test_prometheus_in_compose_scrapes_every_klines_service() -> None:
    """Each long-running klines service of the compose file (every ingest shard included) is a scrape target."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    scraped = {
        target
        for job in yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"]
        for config in job["static_configs"]
        for target in config["targets"]
    }
    services = {}
    for name, svc in compose["services"].items():
        command = svc.get("command") or []
        if command[:2] == ["python", "-m"] and command[2] not in ("services.replay", "services.cli"):
            # /metrics is on the service's HTTP port: the container port it publishes (its healthcheck asks the
            # liveness thread's port instead).
            port = re.fullmatch(r".*:(\d+)", str(svc["ports"][0]))
            assert port is not None, f"{name}: no published HTTP port"
            services[name] = f"{name}:{port.group(1)}"
    assert "ingest-1" in services and "aggregator" in services, sorted(services)
    assert set(services.values()) <= scraped, f"not scraped: {sorted(set(services.values()) - scraped)}"
