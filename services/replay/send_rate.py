"""How fast the replay exchange sends aggTrade frames to one client in fast mode (``speed=0``).

    python -m services.replay.send_rate [--trades 500000] [--symbols 4] [--client aiohttp|websockets]

The exchange runs in this process; the client runs in a child process (as a real consumer would), connects
to the combined stream of every symbol and counts frames until it has them all. The reported rate is frames per
second between the client's first and last frame, so it is bounded by whichever side is slower: the
``websockets`` client library itself tops out near 100k small frames/s in CPython, the aiohttp client (C frame
parser) goes several times higher and shows what the exchange can send.

A measurement tool, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from services.core.models import AggTrade
from services.replay.config import ReplayConfig
from services.replay.exchange import ReplayExchange

START_MS = 1_767_225_600_000


def synthetic_trades(count: int, symbols: int) -> dict[str, list[AggTrade]]:
    """``count`` trades spread over ``symbols`` symbols, 20 per millisecond (no randomness needed here)."""
    names = [f"SYM{i}USDT" for i in range(symbols)]
    out: dict[str, list[AggTrade]] = {name: [] for name in names}
    for i in range(count):
        name = names[i % symbols]
        k = len(out[name])
        out[name].append(
            AggTrade(
                name, 1_000_000 + k, f"{100 + k % 50}.12000000", "0.01000000", k, k, START_MS + i // 20, k % 2 == 0
            )
        )
    return out


async def _client_aiohttp(url: str, expected: int) -> tuple[int, float]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0, compress=0) as ws:
        first = 0.0
        count = 0
        async for _ in ws:
            if count == 0:
                first = time.perf_counter()
            count += 1
            if count == expected:
                break
        return count, time.perf_counter() - first


async def _client_websockets(url: str, expected: int) -> tuple[int, float]:
    import websockets

    async with websockets.connect(url, max_queue=None, compression=None, max_size=None) as ws:
        first = 0.0
        count = 0
        async for _ in ws:
            if count == 0:
                first = time.perf_counter()
            count += 1
            if count == expected:
                break
        return count, time.perf_counter() - first


def _client_main(kind: str, url: str, expected: int) -> None:
    run = _client_aiohttp if kind == "aiohttp" else _client_websockets
    count, seconds = asyncio.run(run(url, expected))
    print(json.dumps({"frames": count, "seconds": seconds}), flush=True)


async def measure(trades: int, symbols: int, client: str) -> dict[str, float]:
    """Replay ``trades`` synthetic trades to one ``client`` process; return frames, seconds and rate."""
    scripted = synthetic_trades(trades, symbols)
    config = ReplayConfig(speed=0)
    async with ReplayExchange(config, trades=scripted) as ex:
        url = ex.stream_url(list(scripted))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.replay.send_rate", "--client-only", client, url, str(trades),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        result = json.loads(out.decode().strip().splitlines()[-1])
    return {"frames": result["frames"], "seconds": result["seconds"], "rate": result["frames"] / result["seconds"]}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m services.replay.send_rate", description=__doc__.split("\n")[0])
    parser.add_argument("--trades", type=int, default=500_000)
    parser.add_argument("--symbols", type=int, default=4)
    parser.add_argument("--client", choices=("aiohttp", "websockets"), default="aiohttp")
    parser.add_argument("--client-only", nargs=3, metavar=("KIND", "URL", "EXPECTED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_only:
        kind, url, expected = args.client_only
        _client_main(kind, url, int(expected))
        return 0
    result = asyncio.run(measure(args.trades, args.symbols, args.client))
    print(
        f"replay send rate: {result['rate']:,.0f} frames/s ({result['frames']:,.0f} frames in "
        f"{result['seconds']:.2f} s, {args.symbols} symbols, one {args.client} client, speed=0)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
