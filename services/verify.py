"""``klines verify``: compare the stored finalized klines with the exchange's own REST klines, field by field.

For every symbol × interval stored in the finalized table, the reference is ``GET {rest_url}/api/v3/klines``
(``/fapi/v1/klines`` for USD-M futures) over the stored time range. The report lists:

* **mismatches**: a stored kline whose open, high, low, close, volume, quote volume, trade count, taker-buy
  volumes, close time or ... differs from the reference (numerically: ``"0.1"`` equals ``"0.10000000"``);
* **gaps**: a reference kline inside the stored range that is missing from the store;
* **extras**: a stored kline the reference does not have (only the exchange's in-progress kline may be absent).

The exchange's last kline is still open, so the comparison stops at the last kline the exchange has closed.
The venue (hence the REST paths) is ``market.venue``. An exchange that cannot be reached or answers with an
error is a :class:`VerifyError`: one line naming the URL and what went wrong, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from services.commands import command
from services.core.intervals import next_open
from services.shared import clickhouse
from services.shared.settings import Settings

# Binance REST row: [t, o, h, l, c, v, T, q, n, V, Q, ignore]
FIELDS = ("open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume", "trade_count",
          "taker_buy_volume", "taker_buy_quote_volume")  # fmt: skip

Fetch = Callable[[str], Any]


@dataclass
class VerifyReport:
    checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)
    pairs: int = 0

    @property
    def ok(self) -> bool:
        return self.checked > 0 and not (self.mismatches or self.gaps or self.extras)

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (
            f"verify {verdict}: {self.checked} klines checked over {self.pairs} symbol×interval pairs, "
            f"{len(self.mismatches)} mismatches, {len(self.gaps)} gaps, {len(self.extras)} extras"
        )


class VerifyError(Exception):
    """The reference could not be read (exchange unreachable, an HTTP error, not JSON); one line."""


def http_json(url: str) -> Any:
    """GET ``url`` as JSON; any failure is a :class:`VerifyError` naming the URL."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (the configured exchange URL)
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise VerifyError(f"the exchange answered HTTP {exc.code} {exc.reason} to GET {url}") from None
    except urllib.error.URLError as exc:
        raise VerifyError(f"the exchange is not reachable at {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise VerifyError(f"GET {url} failed: {exc}") from None


def exchange_klines(
    rest_url: str, venue: str, symbol: str, interval: str, start: int, end: int, fetch: Fetch = http_json
) -> list[list[Any]]:
    """All REST klines with ``start <= t <= end``, paging by 1000 (:class:`VerifyError` on a malformed page)."""
    path = "/fapi/v1/klines" if venue == "usdm" else "/api/v3/klines"
    rows: list[list[Any]] = []
    cursor = start
    while cursor <= end:
        query = urllib.parse.urlencode(
            {"symbol": symbol, "interval": interval, "startTime": cursor, "endTime": end, "limit": 1000}
        )
        url = f"{rest_url.rstrip('/')}{path}?{query}"
        page = fetch(url)
        if not page:
            break
        if not isinstance(page, list) or not all(isinstance(row, list) and len(row) >= 11 for row in page):
            raise VerifyError(f"GET {url} did not answer a list of klines: {str(page)[:200]}")
        rows.extend(page)
        cursor = int(page[-1][0]) + 1
        if len(page) < 1000:
            break
    return rows


def verify(settings: Settings, rest_url: str, fetch: Fetch = http_json) -> VerifyReport:
    ch = settings.clickhouse
    client = clickhouse.connect(ch)
    table = f"{ch.database}.{ch.finalized_table}"
    columns = ", ".join(FIELDS)
    stored_rows = clickhouse.query_rows(
        client, f"SELECT symbol, interval, {columns} FROM {table} FINAL ORDER BY symbol, interval, open_time"
    )
    by_pair: dict[tuple[str, str], dict[int, tuple[Any, ...]]] = {}
    for row in stored_rows:
        by_pair.setdefault((row[0], row[1]), {})[int(row[2])] = tuple(row[2:])
    report = VerifyReport(pairs=len(by_pair))
    for (symbol, interval), stored in sorted(by_pair.items()):
        first, last = min(stored), max(stored)
        reference = exchange_klines(rest_url, settings.market.venue, symbol, interval, first, last, fetch)
        server_time = _server_time(rest_url, settings.market.venue, fetch)
        ref_by_t = {int(r[0]): r for r in reference}
        for t, ref in sorted(ref_by_t.items()):
            if next_open(interval, t) > server_time:
                continue  # still open on the exchange
            mine = stored.get(t)
            if mine is None:
                report.gaps.append(f"{symbol} {interval} {t}: missing from the store")
                continue
            report.checked += 1
            wanted = (int(ref[0]), *(Decimal(str(v)) for v in ref[1:6]), int(ref[6]), Decimal(str(ref[7])),
                      int(ref[8]), Decimal(str(ref[9])), Decimal(str(ref[10])))  # fmt: skip
            got = (int(mine[0]), *(Decimal(v) for v in mine[1:6]), int(mine[6]), Decimal(mine[7]), int(mine[8]),
                   Decimal(mine[9]), Decimal(mine[10]))  # fmt: skip
            diffs = [f"{name} {g} != {w}" for name, g, w in zip(FIELDS, got, wanted, strict=True) if g != w]
            if diffs:
                report.mismatches.append(f"{symbol} {interval} {t}: " + "; ".join(diffs))
        for t in sorted(set(stored) - set(ref_by_t)):
            report.extras.append(f"{symbol} {interval} {t}: stored but unknown to the exchange")
    return report


def _server_time(rest_url: str, venue: str, fetch: Fetch) -> int:
    path = "/fapi/v1/time" if venue == "usdm" else "/api/v3/time"
    answer = fetch(f"{rest_url.rstrip('/')}{path}")
    try:
        return int(answer["serverTime"])
    except (TypeError, KeyError, ValueError):
        raise VerifyError(
            f"GET {rest_url.rstrip('/')}{path} did not answer a serverTime: {str(answer)[:200]}"
        ) from None


def print_report(report: VerifyReport, limit: int = 20, out: Any = None) -> None:
    out = out or sys.stdout
    print(report.summary(), file=out)
    for title, items in (("mismatches", report.mismatches), ("gaps", report.gaps), ("extras", report.extras)):
        for line in items[:limit]:
            print(f"  {title[:-1]}: {line}", file=out)
        if len(items) > limit:
            print(f"  ... and {len(items) - limit} more {title}", file=out)


@command("verify", "compare stored finalized klines with the exchange's REST klines, field by field")
def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rest-url", help="exchange REST base (default: market.rest_url)")
    p.add_argument("--venue", choices=["spot", "usdm"], help="REST paths of this venue (default: market.venue)")
    p.add_argument("--database", help="ClickHouse database (default: clickhouse.database; a fresh run's own)")
    p.add_argument("--show", type=int, default=20, help="how many problems of each kind to list")
    p.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    if args.venue:
        settings = settings.model_copy(update={"market": settings.market.model_copy(update={"venue": args.venue})})
    if args.database:
        ch = settings.clickhouse.model_copy(update={"database": args.database})
        settings = settings.model_copy(update={"clickhouse": ch})
    try:
        report = verify(settings, args.rest_url or settings.market.rest_url)
    except VerifyError as exc:
        print(f"verify FAILED: {exc}", file=sys.stderr)
        return 1
    print_report(report, args.show)
    return 0 if report.ok else 1
