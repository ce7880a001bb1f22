"""Load on the gateway: N WebSocket clients x M subscriptions, fed by klines produced to the topics.

Run: ``KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python benchmarks/bench_gateway.py [--clients N] [--subs M]
[--keys K] [--rate R] [--duration S]`` (``--quick`` for a short run). It

1. creates its own topics and starts ``python -m services.gateway`` as its own process (so its memory is its own);
2. produces one snapshot per key (``BENCH<k>USDT|1m``), then connects N clients (aiohttp), each subscribing to M
   of the K keys round-robin (so each key has N*M/K subscribers), and measures the gateway's RSS before and after;
3. produces R snapshot updates/s spread over the keys for S seconds (producer ``linger_ms=0``), while every client
   reads everything and records ``now - E`` (``E`` = the record's Kafka timestamp): the delivery latency from
   the topic to the client, through broker, gateway fetch, fan-out and the client's socket;
4. prints messages/s delivered (and what full delivery would be), client-side p50/p99/max latency, the gateway's
   own send-side p99, coalesced updates and disconnects, CPU of the gateway process, and memory per client.

``--compare`` runs the same load against a bare fan-out (:func:`serve_bare`: aiokafka consumer + aiohttp
broadcast, no checks, no outbox, no limits) in the same run: the raw limit of this machine's transport.

Everything runs on this machine: broker, gateway and the clients share the cores, so the figures are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.core.intervals import close_time  # noqa: E402
from services.core.models import Kline  # noqa: E402
from services.shared.kafka import delete_topics, ensure_topics, make_producer  # noqa: E402
from services.shared.messages import encode_kline, kline_key  # noqa: E402
from services.shared.settings import KafkaSettings, TopicSettings  # noqa: E402

T0 = 1_767_225_600_000


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def snapshot(symbol: str, close: Decimal, n: int) -> Kline:
    low, high = close - 1, close + 1
    return Kline(
        symbol, "1m", T0, close_time("1m", T0), 1, n, close, high, low, close, Decimal(n), n, False,
        Decimal(n) * close, Decimal(n) / 2, Decimal(n) * close / 2,
    )  # fmt: skip


class Client:
    def __init__(self) -> None:
        self.received = 0
        self.latencies: list[int] = []
        self.closed_reason: str | None = None


async def run_client(
    session: aiohttp.ClientSession, url: str, streams: list[str], client: Client, subscribed: asyncio.Event
) -> None:
    async with session.ws_connect(url, autoping=True, max_msg_size=0) as ws:
        await ws.send_str(json.dumps({"method": "SUBSCRIBE", "params": streams, "id": 1}))
        async for message in ws:
            text = message.data
            if text.startswith('{"e":"kline","E":'):
                now = time.time_ns() // 1_000_000
                client.received += 1
                client.latencies.append(now - int(text[17 : text.index(",", 17)]))
            elif '"result"' in text:
                subscribed.set()
            else:
                client.closed_reason = text[:200]
        client.closed_reason = f"closed {ws.close_code}"


async def serve_bare(port: int, bootstrap: str, topics: list[str]) -> None:
    """The straightforward peer: a bare aiokafka consumer and an aiohttp broadcast of each record as it comes.

    No validation, no ordering rules, no outbox, no limits: each record's value is wrapped with ``E`` and sent
    to every subscriber of its key in turn (a slow client would hold everyone up). It shows what the transport
    itself costs on this machine, the raw limit the gateway is compared with.
    """
    from aiohttp import web
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    await consumer._client.force_metadata_update()
    partitions = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    subscribers: dict[bytes, set[web.WebSocketResponse]] = {}
    seen: set[bytes] = set()

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        keys: list[bytes] = []
        async for message in ws:
            req = json.loads(message.data)
            for stream in req["params"]:
                symbol, _, interval = stream.partition("@kline_")
                keys.append(f"{symbol.upper()}|{interval}".encode())
                subscribers.setdefault(keys[-1], set()).add(ws)
            await ws.send_str(json.dumps({"result": None, "id": req["id"]}))
        for key in keys:
            subscribers[key].discard(ws)
        return ws

    async def status(_request: web.Request) -> web.Response:
        return web.json_response({"ready": True, "keys": len(seen)})

    app = web.Application()
    app.add_routes([web.get("/ws", ws_handler), web.get("/readyz", status), web.get("/metrics.json", status)])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    while True:
        for records in (await consumer.getmany(timeout_ms=500)).values():
            for record in records:
                seen.add(record.key)
                text = f'{{"e":"kline","E":{record.timestamp},"k":{record.value.decode()}}}'
                for ws in list(subscribers.get(record.key, ())):
                    await ws.send_str(text)


async def bench(args: argparse.Namespace, peer: str = "gateway") -> dict[str, Any]:
    name = f"bench-gateway-{uuid.uuid4().hex[:8]}"
    topics = TopicSettings(
        trades=f"{name}.trades",
        finalized=f"{name}.klines.finalized",
        snapshots=f"{name}.klines.snapshots",
        dead_letter=f"{name}.dead-letter",
    )
    kafka = KafkaSettings(bootstrap=args.bootstrap, topics=topics, klines_partitions=3, trades_partitions=1)
    await ensure_topics(kafka)
    port = args.port
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP=args.bootstrap,
        KLINES_KAFKA__TOPICS__SNAPSHOTS=topics.snapshots,
        KLINES_KAFKA__TOPICS__FINALIZED=topics.finalized,
        KLINES_GATEWAY__HTTP_PORT=str(port),
        KLINES_GATEWAY__MAX_CONNECTIONS=str(args.clients + 10),
        KLINES_GATEWAY__MAX_CONNECTIONS_PER_IP=str(args.clients + 10),
        KLINES_GATEWAY__MAX_SUBSCRIPTIONS=str(max(args.subs, 1)),
        KLINES_SERVICE__LOG_FORMAT="text",
        KLINES_SERVICE__LOG_LEVEL="WARNING",
    )
    if peer == "gateway":
        profile = ["-m", "cProfile", "-o", str(Path(args.profile).resolve())] if args.profile else []
        argv = [*profile, "-m", "services.gateway"]
    else:
        argv = [__file__, "--serve-bare", "--port", str(port), "--topics", f"{topics.snapshots},{topics.finalized}"]
    gateway = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env)
    base = f"http://127.0.0.1:{port}"
    producer = make_producer(kafka, client_suffix="bench-gateway", linger_ms=0)
    await producer.start()
    sessions: list[aiohttp.ClientSession] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if get_json(base + "/readyz")["ready"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise RuntimeError("the gateway did not become ready")
            await asyncio.sleep(0.2)
        symbols = [f"BENCH{k}USDT" for k in range(args.keys)]
        seq = 0
        for symbol in symbols:
            seq += 1
            await producer.send(
                topics.snapshots, encode_kline(snapshot(symbol, Decimal(100), 1), seq), key=kline_key(symbol, "1m")
            )
        await producer.flush()
        while get_json(base + "/metrics.json").get("keys", 0) < args.keys:
            await asyncio.sleep(0.1)
        rss_idle = rss_kb(gateway.pid)

        # N clients, each subscribing to M keys round-robin.
        clients = [Client() for _ in range(args.clients)]
        subscribed = [asyncio.Event() for _ in range(args.clients)]
        per_session = 200
        for _ in range(0, args.clients, per_session):
            sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        for i, client in enumerate(clients):
            streams = [f"{symbols[(i * args.subs + j) % args.keys].lower()}@kline_1m" for j in range(args.subs)]
            session = sessions[i // per_session]
            tasks.append(asyncio.create_task(run_client(session, f"{base}/ws", streams, client, subscribed[i])))
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in subscribed)), 120)
        await asyncio.sleep(2.0)
        rss_clients = rss_kb(gateway.pid)
        for client in clients:  # drop the "current kline" sent on subscribe
            client.received = 0
            client.latencies.clear()
        before = get_json(base + "/metrics.json")

        # Load.
        cpu0, t0 = cpu_s(gateway.pid), time.monotonic()
        own_cpu0 = time.process_time()
        produced = 0
        rss_peak = rss_clients
        tick = 0.01
        per_tick = args.rate * tick
        owed = 0.0
        next_at = time.monotonic()
        closes = dict.fromkeys(symbols, Decimal(100))
        while time.monotonic() - t0 < args.duration:
            owed += per_tick
            while owed >= 1:
                owed -= 1
                symbol = symbols[produced % args.keys]
                closes[symbol] += Decimal("0.01")
                seq += 1
                produced += 1
                k = snapshot(symbol, closes[symbol], produced)
                await producer.send(topics.snapshots, encode_kline(k, seq), key=kline_key(symbol, "1m"))
            if produced % max(1, int(args.rate)) < per_tick:
                rss_peak = max(rss_peak, rss_kb(gateway.pid))
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await producer.flush()
        elapsed_produce = time.monotonic() - t0
        await asyncio.sleep(3.0)  # drain
        cpu1 = cpu_s(gateway.pid)
        own_cpu = time.process_time() - own_cpu0
        rss_peak = max(rss_peak, rss_kb(gateway.pid))
        after = get_json(base + "/metrics.json")

        received = sum(c.received for c in clients)
        latencies = sorted(x for c in clients for x in c.latencies)
        subs_per_key = args.clients * args.subs / args.keys
        full = produced * subs_per_key

        def pct(q: float) -> int | None:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

        return {
            "peer": peer,
            "clients": args.clients,
            "subscriptions_per_client": args.subs,
            "keys": args.keys,
            "subscribers_per_key": subs_per_key,
            "updates_produced": produced,
            "produce_rate_per_s": round(produced / elapsed_produce),
            "messages_delivered": received,
            "messages_per_s": round(received / elapsed_produce),
            "full_delivery_messages_per_s": round(full / elapsed_produce),
            "delivered_fraction": round(received / full, 4) if full else None,
            "updates_coalesced": after.get("updates_coalesced", 0) - before.get("updates_coalesced", 0),
            "delivered_or_coalesced_fraction": (
                round((received + after.get("updates_coalesced", 0) - before.get("updates_coalesced", 0)) / full, 4)
                if full
                else None
            ),
            "clients_disconnected_slow": after.get("clients_disconnected_slow", 0),
            "latency_ms_p50": pct(0.50),
            "latency_ms_p99": pct(0.99),
            "latency_ms_max": latencies[-1] if latencies else None,
            "gateway_send_latency_ms_p50": after.get("delivery_latency_ms_p50"),
            "gateway_send_latency_ms_p99": after.get("delivery_latency_ms_p99"),
            "gateway_outbox_wait_ms_p50": after.get("outbox_wait_ms_p50"),
            "gateway_outbox_wait_ms_p99": after.get("outbox_wait_ms_p99"),
            "gateway_cpu_percent": round(100 * (cpu1 - cpu0) / (time.monotonic() - t0)),
            "gateway_cpu_us_per_message": round(1e6 * (cpu1 - cpu0) / received, 1) if received else None,
            "machine_load_avg_1m": os.getloadavg()[0],
            "bench_process_cpu_percent": round(100 * own_cpu / (time.monotonic() - t0)),
            "gateway_rss_mb_no_clients": round(rss_idle / 1024, 1),
            "gateway_rss_mb_with_clients": round(rss_clients / 1024, 1),
            "gateway_rss_mb_peak_under_load": round(rss_peak / 1024, 1),
            "memory_kb_per_client_idle": round((rss_clients - rss_idle) / args.clients, 1),
            "memory_kb_per_client_under_load": round((rss_peak - rss_idle) / args.clients, 1),
            "client_closes": sorted({c.closed_reason for c in clients if c.closed_reason}),
        }
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for session in sessions:
            await session.close()
        await producer.stop()
        gateway.terminate()
        gateway.wait(20)
        await delete_topics(kafka, [topics.trades, topics.finalized, topics.snapshots, topics.dead_letter])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--subs", type=int, default=4, help="subscriptions per client")
    parser.add_argument("--keys", type=int, default=100, help="distinct symbol|interval keys updated")
    parser.add_argument("--rate", type=float, default=1000, help="snapshot updates produced per second")
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--port", type=int, default=18084)
    parser.add_argument("--quick", action="store_true", help="100 clients, 5 s")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--profile", metavar="FILE", help="run the gateway under cProfile, stats to FILE")
    parser.add_argument("--compare", action="store_true", help="also run the bare fan-out peer, same load")
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--topics", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        asyncio.run(serve_bare(args.port, args.bootstrap, args.topics.split(",")))
        return
    if args.quick:
        args.clients, args.duration = min(args.clients, 100), 5
    results = [asyncio.run(bench(args))]
    if args.compare:
        results.append(asyncio.run(bench(args, peer="bare")))
    if args.json:
        print(json.dumps(results if args.compare else results[0]))
        return
    width = max(len(k) for k in results[0])
    for key in results[0]:
        print(f"{key:<{width}}  " + "  ".join(f"{r.get(key, '-')!s:>14}" for r in results))


if __name__ == "__main__":
    main()
