"""``klines run``: its end summary and exit status, a fresh run's namespace, and how it starts the replay market."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from ports import free_port

from services.replay import GeneratorFeed, ReplayConfig, ReplayExchange
from services.runner import LocalPipeline, RunOptions, RunSummary, Service, apply_env, fresh_namespace
from services.shared.settings import Settings

pytestmark = pytest.mark.unit


def clean() -> RunSummary:
    return RunSummary(
        trades_sent=9999,
        trades_published=9999,
        trades_applied=9999,
        klines_finalized=16,
        klines_stored=16,
        exits={"ingest": 0, "aggregator": 0, "writers": 0, "gateway": 0},
        verify="OK: 16 klines checked",
        verify_ok=True,
    )


def test_a_clean_run_exits_0_and_says_nothing_was_lost() -> None:
    summary = clean()
    assert summary.problems() == []
    assert summary.exit_code == 0
    text = "\n".join(summary.lines())
    assert "DATA_LOSS: 0" in text
    assert "trades: sent 9999 (exchange), published 9999 (ingest), applied 9999 (aggregator)" in text
    assert "klines: finalized 16 (aggregator), stored 16 (ClickHouse, FINAL)" in text
    assert text.endswith("result: OK, nothing lost")


def test_dead_letters_are_no_loss_but_the_verdict_names_them() -> None:
    summary = replace(clean(), dead_letters=3)
    assert summary.exit_code == 0
    assert summary.lines()[-1] == "result: OK, nothing lost; 3 records refused with a reason: see the dead-letter topic"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"data_loss": 1}, "1 DATA_LOSS"),
        ({"held_dropped": 5291}, "5291 trades dropped by ingest (5291 held at its stop)"),
        ({"dropped_other": 2}, "2 trades dropped by ingest (0 held at its stop)"),
        ({"trades_published": 9000}, "999 trades the exchange sent were never published"),
        ({"exits": {"ingest": 0, "aggregator": 1}}, "aggregator exit 1"),
        ({"exits": {"ingest": 0, "writers": -9}}, "writers exit -9 (killed)"),
        ({"exits": {"gateway": None}}, "gateway did not stop"),
        ({"drain_problems": ["writers did not drain (lag 3)"]}, "writers did not drain (lag 3)"),
        ({"verify_ok": False}, "verify failed"),
    ],
)
def test_anything_lost_or_unclean_makes_the_exit_status_non_zero(change: dict[str, object], named: str) -> None:
    summary = clean()
    for key, value in change.items():
        setattr(summary, key, value)
    assert summary.exit_code == 1
    assert named in summary.problems()
    assert summary.lines()[-1].startswith("result: FAILED: ") and named in summary.lines()[-1]


def test_dead_letters_are_reported_but_are_not_a_loss() -> None:
    summary = clean()
    summary.dead_letters = 3
    assert "  dead letters: 3" in summary.lines()
    assert summary.exit_code == 0


def test_the_summary_reads_the_services_last_figures_and_their_logs(tmp_path: Path) -> None:
    """Ingest's "flushed" line gives the final published and dropped counts; DATA_LOSS lines of any service
    count, a loss both counted and logged counts once."""
    pipeline = LocalPipeline(Settings(), RunOptions(), out=None)
    pipeline.mode = "replay"
    pipeline.exchange_sent = 9999
    logs: dict[str, list[dict[str, object]]] = {
        "ingest": [
            {"message": "ingest running"},
            {"message": "flushed", "trades_published": 4708, "dropped_held": 5291},
        ],
        "aggregator": [{"message": "finalized kline lost", "log_type": "DATA_LOSS"}],
        "writers": [{"message": "lost", "log_type": "DATA_LOSS"}, {"message": "lost", "log_type": "DATA_LOSS"}],
    }
    for name, records in logs.items():
        service = Service(name, [], None, tmp_path / f"{name}.log")
        previous_run = json.dumps({"message": "flushed", "dropped_held": 7, "log_type": "DATA_LOSS"})
        service.log_path.write_text(previous_run + "\n")
        service.log_start = service.log_path.stat().st_size  # the previous run's lines are not this run's
        with service.log_path.open("a") as log:
            log.write("not json\n" + "".join(json.dumps(r) + "\n" for r in records))
        pipeline.services.append(service)
    pipeline.metrics = {
        "ingest": {"trades_published": 4000, "queue_held": 5291, "dead_letters": 1},
        "aggregator": {"trades_applied": 4708, "klines_finalized": 7, "data_loss": 1, "dead_letters": 2, "lag": None},
        "writers": {"rows_inserted": 9, "dead_letters": 0},
    }
    pipeline.exits = {"ingest": 0, "aggregator": 0, "writers": 0}
    summary = pipeline.summary()
    assert (summary.trades_sent, summary.trades_published, summary.trades_applied) == (9999, 4708, 4708)
    assert summary.held_dropped == 5291
    assert summary.data_loss == 1 + 2
    assert summary.dead_letters == 3
    assert summary.exit_code == 1


def test_a_fresh_run_has_its_own_topics_groups_and_database() -> None:
    settings = Settings()
    env = fresh_namespace(settings, "run-20260301-120000-ab12")
    fresh = apply_env(settings, env)
    topics = fresh.kafka.topics
    assert topics.trades == f"run-20260301-120000-ab12.{settings.kafka.topics.trades}"
    assert topics.finalized == f"run-20260301-120000-ab12.{settings.kafka.topics.finalized}"
    assert topics.snapshots == f"run-20260301-120000-ab12.{settings.kafka.topics.snapshots}"
    assert topics.dead_letter == f"run-20260301-120000-ab12.{settings.kafka.topics.dead_letter}"
    # The client id names the consumer groups and the aggregator's checkpoint topic.
    assert fresh.kafka.client_id == f"{settings.kafka.client_id}-run-20260301-120000-ab12"
    assert fresh.clickhouse.database == f"{settings.clickhouse.database}_run_20260301_120000_ab12"
    assert fresh.clickhouse.dsn == settings.clickhouse.dsn
    other = apply_env(settings, fresh_namespace(settings, "run-20260301-120000-cd34"))
    assert {other.kafka.topics.trades, other.clickhouse.database}.isdisjoint({topics.trades, fresh.clickhouse.database})


def test_the_services_settings_reach_the_run_s_own_reads() -> None:
    """``--verify`` must read the venue the services use (usdm: /fapi/v1/klines) and the run's database."""
    env = {
        "KLINES_MARKET__VENUE": "usdm",
        "KLINES_MARKET__INTERVALS": '["1m"]',
        "KLINES_MARKET__SYMBOLS": '["TRXUSDT"]',
    }
    settings = apply_env(Settings(), env)
    assert settings.market.venue == "usdm"
    assert settings.market.intervals == ("1m",)
    assert settings.market.symbols == ("TRXUSDT",)


def test_verify_asks_the_futures_paths_for_usdm_and_fails_in_one_line() -> None:
    from services.verify import VerifyError, exchange_klines, http_json

    asked: list[str] = []

    def fetch(url: str) -> list[list[object]]:
        asked.append(url)
        return []

    exchange_klines("http://127.0.0.1:1", "usdm", "TRXUSDT", "1m", 0, 60_000, fetch)
    exchange_klines("http://127.0.0.1:1", "spot", "BTCUSDT", "1m", 0, 60_000, fetch)
    assert asked[0].startswith("http://127.0.0.1:1/fapi/v1/klines?symbol=TRXUSDT&interval=1m")
    assert asked[1].startswith("http://127.0.0.1:1/api/v3/klines?symbol=BTCUSDT")
    with pytest.raises(VerifyError, match=r"not reachable at http://127\.0\.0\.1:1/fapi/v1/time"):
        http_json("http://127.0.0.1:1/fapi/v1/time")
    with pytest.raises(VerifyError, match="did not answer a list of klines"):
        exchange_klines("http://x", "usdm", "TRXUSDT", "1m", 0, 1, lambda _url: {"code": -1121, "msg": "Invalid"})


def test_a_generated_market_with_zipf_activity_reaches_the_exchange(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    symbols = ["BTCUSDT", *(f"X{k:03d}USDT" for k in range(1999))]
    out = io.StringIO()
    pipeline = LocalPipeline(Settings(), RunOptions(offline=True, symbols=symbols, zipf=1.2), out)
    pipeline.mode, pipeline.logs = "replay", tmp_path
    started: list[list[str]] = []
    monkeypatch.setattr(Service, "start", lambda self, env: started.append(self.argv))
    monkeypatch.setattr(LocalPipeline, "_wait_replay", lambda self, timeout_s: None)
    pipeline._start_market()
    argv = started[0]
    assert argv[argv.index("--zipf") + 1] == "1.2" and argv[argv.index("--zipf-top") + 1] == "20.0"
    assert argv[argv.index("--symbols") + 1] == ",".join(symbols)
    assert argv[argv.index("--autostart") + 1] == "on_all_subscribed"
    assert "generated BTCUSDT,X000USDT," in out.getvalue() and "and 1,990 more" in out.getvalue()
    started.clear()
    plain = LocalPipeline(Settings(), RunOptions(offline=True, symbols=["BTCUSDT"]), out)
    plain.mode, plain.logs = "replay", tmp_path
    plain._start_market()
    assert "--zipf" not in started[0]  # without the option the exchange generates what it always did


def _replay(tmp_path: Path, argv: list[str]) -> LocalPipeline:
    pipeline = LocalPipeline(Settings(), RunOptions(offline=True, replay_port=free_port()), io.StringIO())
    pipeline.replay = Service("replay exchange", argv, None, tmp_path / "replay.log")
    pipeline.replay.start({})
    return pipeline


def test_the_run_waits_for_a_slow_exchange_while_it_lives_and_gives_up_at_the_timeout(tmp_path: Path) -> None:
    # A large generated market takes minutes before the exchange answers; a fixed wait failed such runs.
    pipeline = _replay(tmp_path, [sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(RuntimeError, match="did not answer within 1 s"):
            pipeline._wait_replay(1.0)
    finally:
        assert pipeline.replay is not None
        pipeline.replay.stop(2)
    gone = _replay(tmp_path, [sys.executable, "-c", "print('no market here')"])
    with pytest.raises(RuntimeError, match=r"exited during its start[\s\S]*no market here"):
        gone._wait_replay(30.0)


def test_the_market_of_a_run_starts_once_every_symbol_is_subscribed() -> None:
    """Ingest subscribes in steps, over connections of at most 1,024 streams: at --speed 0 a market started by
    the first subscription was over before the last symbols were subscribed, and their trades were never seen."""

    async def scenario() -> None:
        feed = GeneratorFeed(symbols=("BTCUSDT", "ETHUSDT", "TRXUSDT"), duration_ms=60_000)
        config = ReplayConfig(feed=feed, speed=0, autostart="on_all_subscribed", port=free_port())
        async with ReplayExchange(config) as exchange, aiohttp.ClientSession() as http:
            first = await http.ws_connect(exchange.stream_url(["BTCUSDT", "ETHUSDT"]))
            await asyncio.sleep(0.3)
            assert not exchange.status()["started"], "two of three symbols subscribed: the market waits"
            second = await http.ws_connect(exchange.stream_url([]))
            await second.send_str(json.dumps({"method": "SUBSCRIBE", "params": ["trxusdt@aggTrade"], "id": 1}))
            for _ in range(50):
                if exchange.status()["started"]:
                    break
                await asyncio.sleep(0.1)
            assert exchange.status()["started"]
            await first.close()
            await second.close()

    asyncio.run(scenario())
