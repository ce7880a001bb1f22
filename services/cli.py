"""``klines``: the one command-line entry point.

    klines run [--offline] [--duration S]   start the broker, embedded ClickHouse and every service
    klines broker start|stop|status         the local single-node Kafka broker
    klines schema apply|check               the versioned ClickHouse DDL
    klines topics [create]                  topics with partitions, end offsets and lag per consumer group
    klines tail TOPIC [--symbol S] [-e]     a topic's messages as JSON lines (or --format pretty)
    klines sql ["SELECT ..." | -]           run a query on the configured ClickHouse (table, or any FORMAT)
    klines replay | verify | tape           see ``klines COMMAND --help``

Global options, accepted before or after the subcommand: ``-b/--bootstrap HOST:PORT`` (``kafka.bootstrap``),
``--dsn DSN`` (``clickhouse.dsn``), ``--config FILE``, and ``--version``. Each is the same as its environment
variable (``KAFKA_BOOTSTRAP``, ``CLICKHOUSE_DSN``, ``KLINES_CONFIG``), for this command and for every process it
starts, and wins over the environment and the config file.

Every command reads the same settings (``--config`` or ``$KLINES_CONFIG``, default ``config/klines.toml``,
overridable by environment variables). A bad setting, an unreachable Kafka or ClickHouse and a bad argument are
one line on stderr that names the address and the setting to change, and exit status 2.

Subcommands are registered with :func:`services.commands.command`; this module imports every module that
registers one (below), and none of them imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The modules that register subcommands besides this one's, imported for that effect.
from services import rebuild, runner, tapes, verify
from services.commands import COMMANDS, KAFKA_SH, Handler, command
from services.console import is_terminal, print_table
from services.shared.settings import ConfigError, Settings, load_settings

SUBCOMMAND_MODULES = (runner, verify, rebuild, tapes)


class UsageError(Exception):
    """A command cannot do what it was asked (no such topic, no query); one line, exit status 2."""


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
        reason = clickhouse.access_skip_reason(settings.clickhouse)
        if reason is not None:
            names = ", ".join(p.name for p in clickhouse.schema_files() if clickhouse.is_access_file(p))
            print(f"skipped: {names} (reader and writer logins): {reason}")
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
    from services.shared.kafka import check_reachable, ensure_topics, topic_overview

    asyncio.run(check_reachable(settings.kafka, timeout_s=KAFKA_CHECK_S))
    if args.action == "create":
        created = asyncio.run(ensure_topics(settings.kafka))
        print(f"created: {', '.join(created)}" if created else "all topics exist")
        return 0
    rows = asyncio.run(topic_overview(settings.kafka))
    print_table(["topic", "partitions", "messages", "group", "lag"], rows)
    return 0


#: How long ``topics`` and ``tail`` wait for the broker's first answer before they report it unreachable.
KAFKA_CHECK_S = 5.0


# --- tail ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartOffset:
    """Where ``tail`` starts in each partition (kcat's ``-o``): ``beginning``, ``end``, an absolute offset, or
    ``-N``: N messages before the end."""

    kind: str  # "beginning" | "end" | "absolute" | "from_end"
    value: int = 0

    def resolve(self, first: int, end: int) -> int:
        """The offset to seek to in a partition that holds ``[first, end)``."""
        if self.kind == "beginning":
            return first
        if self.kind == "end":
            return end
        if self.kind == "from_end":
            return max(first, end - self.value)
        return min(max(first, self.value), end)


def parse_start_offset(text: str) -> StartOffset:
    """``beginning`` | ``end`` | ``N`` | ``-N`` -> :class:`StartOffset`; ``ArgumentTypeError`` otherwise."""
    word = text.strip().lower()
    if word in ("beginning", "earliest"):
        return StartOffset("beginning")
    if word in ("end", "latest"):
        return StartOffset("end")
    if re.fullmatch(r"-\d+", word):
        return StartOffset("from_end", int(word[1:]))
    if re.fullmatch(r"\d+", word):
        return StartOffset("absolute", int(word))
    raise argparse.ArgumentTypeError(f"expected beginning, end, an offset N or -N (N before the end), got {text!r}")


def key_matches(key: str, symbol: str | None, interval: str | None) -> bool:
    """A record key (``SYMBOL`` for trades, ``SYMBOL|INTERVAL`` for klines) against the filters, exactly:
    ``--symbol ETH`` matches ``ETH`` and ``ETH|1m``, not ``ETHBTC``."""
    key_symbol, _, key_interval = key.partition("|")
    if symbol is not None and key_symbol != symbol.upper():
        return False
    return interval is None or key_interval == interval


def tail_line(
    topic: str, partition: int, offset: int, timestamp_ms: int | None, key: str | None, raw: bytes | None
) -> str:
    """One message as a JSON line: ``{"topic", "partition", "offset", "timestamp", "key", "value"}``; the value
    is the decoded JSON when the message is JSON, else its text."""
    value: Any
    if raw is None:
        value = None
    else:
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw.decode(errors="replace")
    record = {"topic": topic, "partition": partition, "offset": offset, "timestamp": timestamp_ms, "key": key}
    record["value"] = value
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def tail_pretty(line: str) -> str:
    """A :func:`tail_line` as a header (``topic[partition]@offset key time``) and the value indented."""
    record = json.loads(line)
    ts = record["timestamp"]
    when = datetime.fromtimestamp(ts / 1000, UTC).isoformat(timespec="milliseconds") if ts is not None else "-"
    head = f"{record['topic']}[{record['partition']}]@{record['offset']}  {record['key'] or '-'}  {when}"
    body = json.dumps(record["value"], ensure_ascii=False, indent=2)
    return head + "\n" + "\n".join("  " + part for part in body.splitlines())


@command("tail", "print a topic's messages as JSON lines (or pretty), optionally filtered; like kcat -C")
def _tail_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("topic", help="a topic name, or one of: trades, finalized, snapshots, dead_letter")
    p.add_argument("--symbol", help="only this symbol (exactly: ETH is not ETHBTC)")
    p.add_argument("--interval", help="only this interval (kline topics)")
    p.add_argument("-p", "--partition", type=int, help="only this partition (default: all)")
    p.add_argument(
        "-o",
        "--offset",
        type=parse_start_offset,
        default=StartOffset("end"),
        metavar="beginning|end|N|-N",
        help="where to start in each partition: beginning, end (default: new messages only), the absolute "
        "offset N, or -N: the last N messages",
    )
    p.add_argument("--from-beginning", action="store_true", help="the same as --offset beginning")
    p.add_argument("-e", "--exit-at-end", action="store_true", help="stop at the end of every partition")
    p.add_argument("-f", "--format", choices=["json", "pretty"], default="json", help="json lines (default), pretty")
    p.add_argument("-n", "--max", type=int, default=0, help="stop after this many messages (0 = no limit)")
    p.add_argument("--timeout", type=float, default=0, help="stop after this many idle seconds (0 = follow)")
    p.set_defaults(handler=_tail)


def _tail(args: argparse.Namespace, settings: Settings) -> int:
    from services.shared.kafka import check_reachable

    topic = getattr(settings.kafka.topics, args.topic, args.topic)
    asyncio.run(check_reachable(settings.kafka, timeout_s=KAFKA_CHECK_S))
    return asyncio.run(_tail_async(settings, topic, args))


async def _tail_async(settings: Settings, topic: str, args: argparse.Namespace) -> int:
    from aiokafka import TopicPartition

    from services.shared.kafka import make_consumer

    start = StartOffset("beginning") if args.from_beginning else args.offset
    consumer = make_consumer(settings.kafka, group_id=None, client_suffix="tail")
    try:
        await consumer.start()
        partitions = await _partitions(consumer, topic)
        if not partitions:
            raise UsageError(f"no topic {topic!r} on the Kafka at {settings.kafka.bootstrap} (see: klines topics)")
        if args.partition is not None:
            if args.partition not in partitions:
                listed = ", ".join(map(str, sorted(partitions)))
                raise UsageError(f"topic {topic!r} has no partition {args.partition} (it has {listed})")
            partitions = {args.partition}
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        firsts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, start.resolve(firsts[tp], ends[tp]))
        pretty = args.format == "pretty"
        shown, idle = 0, 0.0
        while True:
            if args.exit_at_end and await _all_at_end(consumer, ends):
                return 0
            batch = await consumer.getmany(timeout_ms=500)
            if not batch:
                idle += 0.5
                if args.timeout and idle >= args.timeout:
                    return 0
                continue
            idle = 0.0
            for tp, records in batch.items():
                for r in records:
                    if args.exit_at_end and r.offset >= ends[tp]:
                        break  # written after the tail began: not ours to show with --exit-at-end
                    key = r.key.decode(errors="replace") if r.key is not None else None
                    if (args.symbol or args.interval) and not key_matches(key or "", args.symbol, args.interval):
                        continue
                    line = tail_line(r.topic, r.partition, r.offset, r.timestamp, key, r.value)
                    print(tail_pretty(line) if pretty else line, flush=True)
                    shown += 1
                    if args.max and shown >= args.max:
                        return 0
    finally:
        await consumer.stop()


async def _partitions(consumer: Any, topic: str) -> set[int]:
    parts: set[int] = consumer.partitions_for_topic(topic) or set()
    if not parts:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
    return parts


async def _all_at_end(consumer: Any, ends: dict[Any, int]) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


# --- sql ----------------------------------------------------------------------------------------------------

#: A trailing ``FORMAT name`` clause (optionally followed by ``SETTINGS ...``), after comments are removed.
FORMAT_CLAUSE = re.compile(r"\bFORMAT\s+([A-Za-z][A-Za-z0-9_]*)(\s+SETTINGS\b[^;]*)?\s*;?\s*$", re.IGNORECASE)
FORMAT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


def query_format(query: str) -> str | None:
    """The output format the query names itself (``SELECT 1 FORMAT JSONEachRow`` -> ``JSONEachRow``), or None.

    Comments are ignored; string literals are not parsed, so a query whose last string ends like a FORMAT
    clause would be misread (pass ``--format table`` then is not a way out either: rewrite the literal).
    """
    match = FORMAT_CLAUSE.search(_COMMENTS.sub(" ", query))
    return match.group(1) if match else None


def read_query(text: str | None, stdin: Any) -> str:
    """The query argument, or stdin's text for ``-`` or none; one trailing ``;`` dropped."""
    if text is None or text == "-":
        if text is None and is_terminal(stdin):
            raise UsageError('no query: give one ("SELECT ...") or pipe it on stdin')
        text = stdin.read()
    query = text.strip().removesuffix(";").strip()
    if not query:
        raise UsageError("the query is empty")
    return query


@command("sql", "run a query on the configured ClickHouse: a table, or any ClickHouse output FORMAT")
def _sql_args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run one query on the configured ClickHouse (clickhouse.dsn, --dsn). A query that ends with "
        "FORMAT <name> prints exactly what ClickHouse returns in that format, like clickhouse-client; "
        "otherwise --format picks the format, and the default is a table with decimals in their shortest "
        "exact form (97000.1). On a server it logs in as the read-only reader (clickhouse.reader_username) "
        "when clickhouse.reader_password is set; --admin uses clickhouse.username instead."
    )
    p.add_argument("query", nargs="?", help='the query; "-" or none: read it from stdin')
    p.add_argument(
        "-f",
        "--format",
        default="table",
        metavar="FORMAT",
        help="table (default), or a ClickHouse output format: TSV, TSVWithNames, CSVWithNames, JSONEachRow, "
        "JSON, Pretty, Vertical, ... (a FORMAT clause in the query wins)",
    )
    p.add_argument(
        "--admin",
        action="store_true",
        help="log in as clickhouse.username (the admin) rather than the read-only reader",
    )
    p.set_defaults(handler=_sql)


def _sql(args: argparse.Namespace, settings: Settings) -> int:
    from services.shared import clickhouse

    if args.format.lower() != "table" and not FORMAT_NAME.fullmatch(args.format):
        raise UsageError(f"--format {args.format!r} is not a format name (table, TSV, JSONEachRow, ...)")
    query = read_query(args.query, sys.stdin)
    client = clickhouse.connect(settings.clickhouse if args.admin else settings.clickhouse.as_reader())
    own = query_format(query)
    if own is not None or args.format.lower() != "table":
        data: bytes = client.raw_query(query, fmt=None if own is not None else args.format)
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    result = client.query(query)
    if result.column_names:
        print_table(list(result.column_names), result.result_rows)
    return 0


# --- entry point --------------------------------------------------------------------------------------------

#: Global option -> the environment variable it sets (for this process's settings and the ones it starts).
GLOBAL_ENV = {"bootstrap": "KAFKA_BOOTSTRAP", "dsn": "CLICKHOUSE_DSN", "config": "KLINES_CONFIG"}
GLOBAL_FLAGS = {"bootstrap": "-b/--bootstrap", "dsn": "--dsn", "config": "--config"}


def _global_options(*, on_subcommand: bool) -> argparse.ArgumentParser:
    """The options every subcommand takes, before or after its name. On the subcommand their default is
    ``SUPPRESS``, so an option given before the subcommand is not reset by the subcommand's parser."""
    parser = argparse.ArgumentParser(add_help=False)
    default: Any = argparse.SUPPRESS if on_subcommand else None
    group = parser.add_argument_group("global options (before or after the command)")
    group.add_argument(
        "-b",
        "--bootstrap",
        metavar="HOST:PORT[,...]",
        default=default,
        help="Kafka bootstrap servers (kafka.bootstrap; $KAFKA_BOOTSTRAP)",
    )
    group.add_argument(
        "--dsn", default=default, help="ClickHouse: http(s)://host:port or chdb:DIR (clickhouse.dsn; $CLICKHOUSE_DSN)"
    )
    group.add_argument(
        "--config", type=Path, default=default, help="TOML config (default: $KLINES_CONFIG or config/klines.toml)"
    )
    return parser


#: The order of ``klines --help``: the pipeline first, then its inspection tools, then the offline tools.
HELP_ORDER = ("run", "broker", "schema", "topics", "tail", "sql", "replay", "verify", "tape")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("klines")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klines",
        description="Binance-exact klines from aggTrade streams: Kafka microservices into ClickHouse.",
        parents=[_global_options(on_subcommand=False)],
    )
    parser.add_argument("--version", action="version", version=f"klines {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    on_subcommand = _global_options(on_subcommand=True)
    ordered = sorted(COMMANDS, key=lambda name: HELP_ORDER.index(name) if name in HELP_ORDER else len(HELP_ORDER))
    for name in ordered:
        configure, help_text = COMMANDS[name]
        configure(sub.add_parser(name, help=help_text, description=help_text, parents=[on_subcommand]))
    return parser


@contextlib.contextmanager
def _global_environment(args: argparse.Namespace) -> Iterator[None]:
    """Set the environment variables of the global options given, for the command's run; restore them after."""
    given = {env: str(getattr(args, name)) for name, env in GLOBAL_ENV.items() if getattr(args, name, None)}
    if "KLINES_CONFIG" in given:
        given["KLINES_CONFIG"] = str(Path(given["KLINES_CONFIG"]).resolve())
    saved = {env: os.environ.get(env) for env in given}
    os.environ.update(given)
    try:
        yield
    finally:
        for env, old in saved.items():
            if old is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = old


def _from_option(message: str, args: argparse.Namespace) -> str:
    """A settings error caused by a global option names the option, not the variable it was passed through."""
    for name, env in GLOBAL_ENV.items():
        if getattr(args, name, None):
            message = message.replace(f"environment variable {env}", GLOBAL_FLAGS[name])
    return message


def one_line_error(exc: BaseException, settings: Settings, config: str) -> str | None:
    """The one line for a failure to reach Kafka or ClickHouse, a query ClickHouse refused, or a
    :class:`UsageError`; None for any other exception (a bug: its traceback is shown)."""
    from aiokafka.errors import KafkaConnectionError, KafkaError
    from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

    from services.shared.clickhouse import ClickHouseUnavailable, SchemaError
    from services.shared.embedded import EmbeddedEngineGone, EmbeddedError
    from services.shared.kafka import KafkaUnreachable

    bootstrap, dsn = settings.kafka.bootstrap, settings.clickhouse.dsn
    kafka_hint = f"check -b/--bootstrap, kafka.bootstrap in {config} or KAFKA_BOOTSTRAP, or run: klines broker start"
    if isinstance(exc, KafkaUnreachable):
        return f"cannot reach Kafka at {bootstrap}: {kafka_hint}"
    if isinstance(exc, KafkaConnectionError | KafkaError):
        return f"Kafka at {bootstrap}: {_first_line(exc)}; {kafka_hint}"
    if isinstance(exc, SchemaError | ClickHouseUnavailable | UsageError):
        return str(exc)
    if isinstance(exc, OperationalError | EmbeddedEngineGone):
        return (
            f"ClickHouse at {dsn} is not reachable ({_first_line(exc)}); check --dsn, clickhouse.dsn in {config} "
            "or CLICKHOUSE_DSN"
        )
    if isinstance(exc, ClickHouseError | EmbeddedError):
        return f"ClickHouse at {dsn}: {_first_line(exc)}"
    return None


def _first_line(exc: BaseException) -> str:
    """The gist of ``exc``: the operating system's reason when it carries one (``Connection refused``), else
    its first line."""
    text = str(exc).strip()
    reason = re.search(r"\[Errno -?\d+\] ([^\"')\]]+)", text)
    if reason:
        return reason.group(1).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    # Errors reach the user once, as one line from here; the clients' own error logs would repeat them.
    for name in ("clickhouse_connect", "aiokafka"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    parser = build_parser()
    args = parser.parse_args(argv)
    with _global_environment(args):
        try:
            settings = load_settings()
        except ConfigError as exc:
            print(f"klines: {_from_option(str(exc), args)}", file=sys.stderr)
            return 2
        handler: Handler = args.handler
        try:
            return handler(args, settings)
        except KeyboardInterrupt:
            return 130
        except ConfigError as exc:
            print(f"klines: {_from_option(str(exc), args)}", file=sys.stderr)
            return 2
        except Exception as exc:
            config = os.environ.get("KLINES_CONFIG", "config/klines.toml")
            line = one_line_error(exc, settings, config)
            if line is None:
                raise
            print(f"klines: {line}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
