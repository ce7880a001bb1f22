"""``klines``: the one command-line entry point.

    klines run [--offline] [--duration S]   start the broker, embedded ClickHouse and every service
    klines broker start|stop|status         the local single-node Kafka broker
    klines schema apply|check               the versioned ClickHouse DDL
    klines topics [create]                  topics with partitions, end offsets and lag per consumer group
    klines tail TOPIC [--symbol S]          pretty-print a topic's messages
    klines sql "SELECT ..."                 run a query on the configured ClickHouse and print a table

Every command reads the same settings (``--config`` or ``$KLINES_CONFIG``, default ``config/klines.toml``,
overridable by environment variables) and prints a one-line error, exit code 2, for a bad setting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.shared.settings import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"

Handler = Callable[[argparse.Namespace, Settings], int]
Configure = Callable[[argparse.ArgumentParser], None]
_COMMANDS: dict[str, tuple[Configure, str]] = {}


def command(name: str, help_text: str) -> Callable[[Configure], Configure]:
    """Register ``klines NAME``: decorate the function that adds its arguments and sets ``handler``."""

    def wrap(configure: Configure) -> Configure:
        _COMMANDS[name] = (configure, help_text)
        return configure

    return wrap


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], out: Any = None) -> None:
    out = out or sys.stdout
    cells = [[str(h) for h in header]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


# --- broker -------------------------------------------------------------------------------------------------


@command("broker", "start, stop or check the local single-node Kafka broker (KRaft)")
def _broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["start", "stop", "status", "fetch"])
    p.set_defaults(handler=_broker)


def _broker(args: argparse.Namespace, _settings: Settings) -> int:
    return subprocess.run([str(KAFKA_SH), args.action], check=False).returncode


# --- schema -------------------------------------------------------------------------------------------------


@command("schema", "apply or check the versioned ClickHouse DDL (deploy/clickhouse/*.sql)")
def _schema_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["apply", "check"])
    p.set_defaults(handler=_schema)


def _schema(args: argparse.Namespace, settings: Settings) -> int:
    from services.shared import clickhouse

    client = clickhouse.connect(settings.clickhouse)
    if args.action == "apply":
        applied = clickhouse.apply_schema(client, settings.clickhouse)
        print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
    for table in clickhouse.table_names(settings.clickhouse):
        clickhouse.check_table(client, settings.clickhouse, table)
        print(f"ok: {settings.clickhouse.database}.{table}")
    return 0


# --- topics -------------------------------------------------------------------------------------------------


@command("topics", "list the topics with partitions, end offsets and lag per group; or create them")
def _topics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["list", "create"], default="list")
    p.set_defaults(handler=_topics)


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    from services.shared.kafka import ensure_topics, topic_overview

    if args.action == "create":
        created = asyncio.run(ensure_topics(settings.kafka))
        print(f"created: {', '.join(created)}" if created else "all topics exist")
        return 0
    rows = asyncio.run(topic_overview(settings.kafka))
    print_table(["topic", "partitions", "messages", "group", "lag"], rows)
    return 0


# --- tail ---------------------------------------------------------------------------------------------------


@command("tail", "pretty-print a topic's messages (JSON values), optionally filtered")
def _tail_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("topic", help="a topic name, or one of: trades, finalized, snapshots, dead_letter")
    p.add_argument("--symbol", help="only this symbol")
    p.add_argument("--interval", help="only this interval (kline topics)")
    p.add_argument("--from-beginning", action="store_true", help="start at the oldest message")
    p.add_argument("-n", "--max", type=int, default=0, help="stop after this many messages (0 = follow)")
    p.add_argument("--timeout", type=float, default=0, help="stop after this many idle seconds (0 = follow)")
    p.set_defaults(handler=_tail)


def _tail(args: argparse.Namespace, settings: Settings) -> int:
    topic = getattr(settings.kafka.topics, args.topic, args.topic)
    return asyncio.run(_tail_async(settings, topic, args))


async def _tail_async(settings: Settings, topic: str, args: argparse.Namespace) -> int:
    from services.shared.kafka import make_consumer

    consumer = make_consumer(
        settings.kafka,
        topic,
        group_id=None,
        client_suffix="tail",
        auto_offset_reset="earliest" if args.from_beginning else "latest",
    )
    await consumer.start()
    shown = 0
    idle = 0.0
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            if not batch:
                idle += 0.5
                if args.timeout and idle >= args.timeout:
                    return 0
                continue
            idle = 0.0
            for records in batch.values():
                for r in records:
                    key = r.key.decode(errors="replace") if r.key else ""
                    if args.symbol and not key.startswith(args.symbol.upper()):
                        continue
                    if args.interval and not key.endswith(f"|{args.interval}"):
                        continue
                    try:
                        value: Any = json.loads(r.value) if r.value is not None else None
                        text = json.dumps(value, ensure_ascii=False)
                    except ValueError:
                        text = repr(r.value)
                    print(f"{r.topic}[{r.partition}]@{r.offset} {key} {text}", flush=True)
                    shown += 1
                    if args.max and shown >= args.max:
                        return 0
    finally:
        await consumer.stop()


# --- sql ----------------------------------------------------------------------------------------------------


@command("sql", "run a query on the configured ClickHouse and print the result as a table")
def _sql_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("query")
    p.set_defaults(handler=_sql)


def _sql(args: argparse.Namespace, settings: Settings) -> int:
    from services.shared import clickhouse

    client = clickhouse.connect(settings.clickhouse)
    result = client.query(args.query)
    print_table(list(result.column_names), result.result_rows)
    return 0


# --- entry point --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klines",
        description="Binance-exact klines from aggTrade streams: Kafka microservices into ClickHouse.",
    )
    parser.add_argument("--config", type=Path, help="TOML config (default: $KLINES_CONFIG or config/klines.toml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registry = _load_plugins()
    for name, (configure, help_text) in registry.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _load_plugins() -> dict[str, tuple[Configure, str]]:
    """Import the modules that register more commands (run, verify); return the registry.

    The registry is the one of the importable ``services.cli`` module, which is not this module when it runs as
    ``python -m services.cli`` (then this is ``__main__``, and the plugins register into ``services.cli``).
    """
    import importlib

    for module in ("services.runner", "services.verify", "services.rebuild", "services.tapes"):
        importlib.import_module(module)
    registry: dict[str, tuple[Configure, str]] = importlib.import_module("services.cli")._COMMANDS
    return registry


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    # Errors reach the user once, as one line from here; the driver's own error log would repeat them.
    logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"klines: {exc}", file=sys.stderr)
        return 2
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from clickhouse_connect.driver.exceptions import ClickHouseError

        from services.shared.clickhouse import ClickHouseUnavailable, SchemaError
        from services.shared.kafka import KafkaUnreachable

        if isinstance(exc, SchemaError | KafkaUnreachable | ClickHouseUnavailable):
            print(f"klines: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, ClickHouseError):
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"klines: ClickHouse at {settings.clickhouse.dsn}: {first_line}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
