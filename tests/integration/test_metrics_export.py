"""``/metrics`` of every service, scraped as Prometheus scrapes it and parsed with ``prometheus_client``'s parser.

Each service is started the way its own integration tests start it (same helpers), given a little work, and its
exposition must parse and carry the families the dashboard and the alert rules use, with values that agree with
what the service did. ``/metrics.json`` stays the same figures as JSON.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from services.aggregator.clock import ManualClock
from services.aggregator.worker import AggregatorWorker
from services.core.models import REASON_CATEGORIES
from services.finalized_writer import finalized_spec
from services.replay import ReplayExchange
from services.shared.messages import encode_kline, encode_trade_batch, kline_key
from services.shared.settings import Settings
from services.snapshot_writer import snapshot_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_aggregator_stream import agg_settings as agg_settings  # the fixture, shared
from test_aggregator_stream import batches, end_of_stream, eventually, oracle, run_worker, scripted_trades
from test_aggregator_stream import produce as produce_trades
from test_gateway import Producer, connect, kline, recv_json, request, running_gateway
from test_ingest import drained as ingest_drained
from test_ingest import exchange_config, for_exchange, ingest
from test_writers import (
    apply_schema,
    finalized_records,
    finalized_script,
    produce,
    snapshot_records,
    snapshot_script,
    start_serving,
    unique_client,
    until,
)
from test_writers import drained as writer_drained

pytestmark = pytest.mark.integration


class Scrape:
    """One parsed ``/metrics`` answer: samples by name, families by name and type."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: list[Sample] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            self.samples.extend(family.samples)

    def values(self, name: str, **labels: str) -> list[float]:
        return [s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()]

    def value(self, name: str, **labels: str) -> float:
        found = self.values(name, **labels)
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0]


async def scrape(port: int) -> tuple[Scrape, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            parsed = Scrape(await response.text())
        async with http.get(f"http://127.0.0.1:{port}/metrics.json") as response:
            figures: dict[str, Any] = await response.json()
    return parsed, figures


def assert_common(scraped: Scrape, service: str) -> None:
    assert scraped.value("klines_service_ready", service=service) == 1
    assert scraped.types["process_resident_memory_bytes"] == "gauge"
    assert scraped.value("process_cpu_seconds_total") > 0


def assert_types(scraped: Scrape, expected: Mapping[str, str]) -> None:
    for family, kind in expected.items():
        assert scraped.types.get(family) == kind, f"{family}: {scraped.types.get(family)} instead of {kind}"


def assert_dead_letters_by_reason(
    scraped: Scrape, figures: Mapping[str, Any], service: str, expected: Mapping[str, int]
) -> None:
    """``klines_<service>_dead_letters_by_reason_total{reason=...}``: a counter per category (the others at 0),
    the same as ``dead_letters_by_reason`` in ``/metrics.json``, and adding up to the service's dead letters."""
    name = f"klines_{service}_dead_letters_by_reason"
    assert scraped.types.get(name) == "counter", scraped.types.get(name)
    by_reason = {s.labels["reason"]: s.value for s in scraped.samples if s.name == f"{name}_total"}
    assert by_reason == {category: float(expected.get(category, 0)) for category in REASON_CATEGORIES}
    assert figures["dead_letters_by_reason"] == {category: int(n) for category, n in by_reason.items()}
    assert sum(scraped.values(f"klines_{service}_dead_letters_total")) == sum(expected.values())


async def test_aggregator_exports_its_counters_lag_and_partition_offsets(agg_settings: Settings) -> None:
    s = agg_settings
    streams = scripted_trades(["BTCUSDT", "ETHUSDT"], minutes=4, seed=5)
    records: list[tuple[bytes | None, bytes]] = [
        (sym.encode(), encode_trade_batch(sym, b)) for sym, b in batches(streams, 3)
    ]
    # Two bad records among them: a trade with a negative price, and a value that is not JSON.
    bad_trade = encode_trade_batch("BTCUSDT", streams["BTCUSDT"][:1]).replace(b'"p":"', b'"p":"-', 1)
    records[len(records) // 2 : len(records) // 2] = [(b"BTCUSDT", bad_trade), (b"ETHUSDT", b"{not json")]
    clock = ManualClock()

    async def body(worker: AggregatorWorker) -> tuple[Scrape, dict[str, Any]]:
        engine = worker.engine
        assert engine is not None
        await produce_trades(s, records)
        await eventually(lambda: engine.ready and engine.lag() == 0 and engine.stats.records == len(records), 30, "")
        clock.set(end_of_stream(streams, s.aggregator.grace_ms))
        await eventually(lambda: engine.stats.finalized_confirmed >= len(oracle(streams)), 15, "finalized klines")
        return await scrape(worker.port)

    scraped, figures = await run_worker(s, clock, body)
    assert_common(scraped, "aggregator")
    assert_types(
        scraped,
        {
            "klines_aggregator_trades_applied": "counter",
            "klines_aggregator_klines_finalized": "counter",
            "klines_aggregator_data_loss": "counter",
            "klines_aggregator_dead_letters": "counter",
            "klines_aggregator_lag": "gauge",
            "klines_aggregator_read_offsets": "gauge",
            "klines_aggregator_in_flight": "gauge",
            "klines_aggregator_close_to_produced_seconds": "histogram",
        },
    )
    trades = sum(len(v) for v in streams.values())
    acknowledged = sum(scraped.values("klines_aggregator_close_to_produced_seconds_count"))
    assert acknowledged == scraped.value("klines_aggregator_finalized_confirmed_total") >= len(oracle(streams))
    assert scraped.value("klines_aggregator_trades_applied_total") == trades
    assert scraped.value("klines_aggregator_klines_finalized_total") >= len(oracle(streams))
    assert scraped.value("klines_aggregator_data_loss_total") == 0
    assert scraped.value("klines_aggregator_lag") == 0
    offsets = {s.labels["partition"]: s.value for s in scraped.samples if s.name == "klines_aggregator_read_offsets"}
    assert offsets == {str(p): float(v) for p, v in figures["read_offsets"].items()}
    assert sum(offsets.values()) == len(records)
    assert_dead_letters_by_reason(scraped, figures, "aggregator", {"field": 1, "malformed": 1})


async def test_writers_export_per_writer_figures_and_histograms(settings: Settings) -> None:
    settings = unique_client(settings)
    apply_schema(settings)
    finals = finalized_script(120)  # every fifth kline comes again as a correction (version 1)
    snaps = snapshot_script(60)
    await produce(settings, settings.kafka.topics.finalized, finalized_records(finals))
    # Two bad records on the snapshot topic: one without 'seq' (it cannot be ordered), one that is not JSON.
    unordered = (kline_key(snaps[0][0].s, snaps[0][0].i), encode_kline(snaps[0][0]))
    bad = [unordered, (unordered[0], b"{not json")]
    await produce(settings, settings.kafka.topics.snapshots, snapshot_records(snaps) + bad)
    served = await start_serving(settings, ["finalized", "snapshot"])
    try:
        await until(lambda: writer_drained(settings, finalized_spec(settings)), 30, "finalized committed")
        await until(lambda: writer_drained(settings, snapshot_spec(settings)), 30, "snapshots committed")
        scraped, figures = await scrape(served.health.port)
    finally:
        assert await served.stop() == 0

    assert_common(scraped, "writers")
    assert_types(
        scraped,
        {
            "klines_writers_rows_inserted": "counter",
            "klines_writers_insert_retries": "counter",
            "klines_writers_corrections": "counter",
            "klines_writers_dead_letters": "counter",
            "klines_writers_lag": "gauge",
            "klines_writers_insert_duration_seconds": "histogram",
            "klines_writers_batch_rows": "histogram",
            "klines_writers_close_to_stored_seconds": "histogram",
        },
    )
    fin, snap = {"writer": "finalized_writer"}, {"writer": "snapshot_writer"}
    assert scraped.value("klines_writers_rows_inserted_total", **fin) == len(finals)
    assert scraped.value("klines_writers_rows_inserted_total", **snap) == len(snaps)
    assert scraped.value("klines_writers_corrections_total", **fin) == sum(1 for k in finals if k.version > 0)
    assert scraped.value("klines_writers_lag", **fin) == 0
    # The histograms agree with the counters: every stored row in one batch, every batch timed.
    assert scraped.value("klines_writers_batch_rows_sum", **fin) == len(finals)
    batches_stored = figures["writers"]["finalized_writer"]["batches"]
    assert scraped.value("klines_writers_batch_rows_count", **fin) == batches_stored
    assert scraped.value("klines_writers_insert_duration_seconds_count", **fin) == batches_stored
    assert scraped.value("klines_writers_insert_duration_seconds_sum", **fin) > 0
    # The script's klines closed in 2023: each one is counted, in the +Inf bucket, under its interval.
    assert scraped.value("klines_writers_close_to_stored_seconds_count", interval="1m", **fin) == len(finals)
    assert scraped.value("klines_writers_close_to_stored_seconds_bucket", le="+Inf", interval="1m", **fin) == len(
        finals
    )
    assert scraped.values("klines_writers_close_to_stored_seconds_count", **snap) == []  # open klines: no latency
    assert scraped.value("klines_writers_dead_letters_total", **snap) == 2
    assert_dead_letters_by_reason(scraped, figures, "writers", {"topic": 1, "malformed": 1})
    # Process-wide sums are left to PromQL: no unlabelled duplicate of a per-writer family.
    assert all(s.labels.get("writer") for s in scraped.samples if s.name == "klines_writers_rows_inserted_total")


async def test_gateway_exports_its_delivery_latency_histogram(settings: Settings) -> None:
    async with running_gateway(settings) as gw, Producer(settings) as producer:
        ws = await connect(gw.url())
        await request(ws, {"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 1})
        for n in (1, 2, 3):
            await producer.snapshot(kline(close=f"{100 + n}", n=n))
            await recv_json(ws)
        scraped, figures = await scrape(gw.port)
        await ws.close()

    assert_common(scraped, "gateway")
    assert_types(
        scraped,
        {
            "klines_gateway_messages_out": "counter",
            "klines_gateway_updates_published": "counter",
            "klines_gateway_clients": "gauge",
            "klines_gateway_lag": "gauge",
            "klines_gateway_delivery_latency_seconds": "histogram",
        },
    )
    assert scraped.value("klines_gateway_clients") == 1
    assert scraped.value("klines_gateway_messages_out_total") == figures["messages_out"] >= 3
    assert scraped.value("klines_gateway_delivery_latency_seconds_count") >= 3
    assert scraped.value("klines_gateway_delivery_latency_seconds_bucket", le="+Inf") >= 3


async def test_ingest_exports_trades_gaps_and_data_loss(settings: Settings) -> None:
    async with ReplayExchange(exchange_config(minutes=1)) as ex:
        s = for_exchange(settings, ex)
        async with ingest(s) as service:
            ex.start_feed()
            await ingest_drained(service, ex, ("BTCUSDT", "ETHUSDT"))
            # Two bad frames: cut in half (not JSON), and a negative price.
            assert ex.faults.send_malformed("bad_json", "BTCUSDT") == 1
            assert ex.faults.send_malformed("negative_price", "ETHUSDT") == 1
            publisher = service.publisher
            assert publisher is not None
            await eventually(lambda: publisher.dead_letters_published == 2 and publisher.idle, 10, "dead letters sent")
            assert service.health is not None
            scraped, figures = await scrape(service.health.port)

    assert_common(scraped, "ingest")
    assert_types(
        scraped,
        {
            "klines_ingest_trades_received": "counter",
            "klines_ingest_trades_published": "counter",
            "klines_ingest_data_loss_events": "counter",
            "klines_ingest_gaps_repaired": "counter",
            "klines_ingest_dead_letters": "counter",
            "klines_ingest_queue_depth": "gauge",
            "klines_ingest_connections_open": "gauge",
        },
    )
    published = sum(len(ex.trades(sym)) for sym in ("BTCUSDT", "ETHUSDT"))
    assert scraped.value("klines_ingest_trades_published_total") == figures["trades_published"] == published
    assert scraped.value("klines_ingest_data_loss_events_total") == 0
    assert scraped.value("klines_ingest_connections_open") >= 1
    assert "klines_ingest_fatal" not in scraped.types  # text (or None) is left to /metrics.json
    assert_dead_letters_by_reason(scraped, figures, "ingest", {"malformed": 1, "field": 1})
