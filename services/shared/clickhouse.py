"""The one ClickHouse path: connect, apply and check the versioned schema, and insert kline rows idempotently.

Both writers persist through :func:`insert_klines` (the seed's ``persist_kline_data``). Access goes through
clickhouse-connect only: a server (``http://host:8123``) or the embedded chDB engine (``chdb:///dir``). An
embedded data directory can be open in one process at a time, so a process keeps one client per directory
(:func:`connect` caches it) and shares it between its writers.

clickhouse-connect's client is synchronous (the chDB backend has no async client); async callers run these
functions in a worker thread (``asyncio.to_thread``), one insert at a time per client.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import clickhouse_connect

from services.shared.settings import ClickHouseSettings

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "deploy" / "clickhouse"
SCHEMA_VERSION_TABLE = "schema_version"

KLINE_COLUMNS: tuple[str, ...] = (
    "symbol",
    "interval",
    "open_time",
    "close_time",
    "first_trade_id",
    "last_trade_id",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "trade_count",
    "taker_buy_volume",
    "taker_buy_quote_volume",
    "version",
    "source",
    "kafka_partition",
    "kafka_offset",
    "batch_token",
)


class SchemaError(Exception):
    """A table is missing or lacks the version/deduplication setup the writers rely on."""


class ClickHouseUnavailable(Exception):
    """ClickHouse could not be reached or refused the request (retryable)."""


_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()
# One client is shared by the writers of a process (chDB allows one directory per process); its calls are
# serialised, since a clickhouse-connect client is not safe for concurrent use from several threads.
_call_locks: dict[int, threading.Lock] = {}


def _call_lock(client: Any) -> threading.Lock:
    with _clients_lock:
        return _call_locks.setdefault(id(client), threading.Lock())


def connect(settings: ClickHouseSettings) -> Any:
    """Return the process's client for ``settings.dsn`` (one per embedded directory), creating the database."""
    with _clients_lock:
        client = _clients.get(settings.dsn)
        if client is None:
            if settings.embedded:
                path = settings.dsn.removeprefix("chdb://")
                if path.startswith("/"):
                    Path(path).mkdir(parents=True, exist_ok=True)
                client = clickhouse_connect.get_client(dsn=settings.dsn)
            else:
                client = clickhouse_connect.get_client(
                    dsn=settings.dsn,
                    username=settings.username,
                    password=settings.password.get_secret_value(),
                    connect_timeout=10,
                    send_receive_timeout=30,
                )
            _clients[settings.dsn] = client
        client.command(f"CREATE DATABASE IF NOT EXISTS {_ident(settings.database)}")
        return client


def close(settings: ClickHouseSettings) -> None:
    """Close and forget the cached client for ``settings.dsn`` (releases an embedded directory)."""
    with _clients_lock:
        client = _clients.pop(settings.dsn, None)
    if client is not None:
        client.close()


def _ident(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"{name!r} is not a plain ClickHouse identifier")
    return name


def schema_files() -> list[Path]:
    return sorted(SCHEMA_DIR.glob("[0-9][0-9][0-9]_*.sql"))


def render_ddl(path: Path, settings: ClickHouseSettings) -> str:
    return path.read_text().format(
        database=_ident(settings.database),
        finalized_table=_ident(settings.finalized_table),
        snapshots_table=_ident(settings.snapshots_table),
        dedup_window=int(settings.dedup_window),
    )


def apply_schema(client: Any, settings: ClickHouseSettings) -> list[str]:
    """Apply every DDL file not yet recorded in ``schema_version``; return the names applied."""
    db = _ident(settings.database)
    client.command(
        f"CREATE TABLE IF NOT EXISTS {db}.{SCHEMA_VERSION_TABLE} "
        "(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {row[0] for row in client.query(f"SELECT version FROM {db}.{SCHEMA_VERSION_TABLE} FINAL").result_rows}
    applied = []
    for path in schema_files():
        version = int(path.name[:3])
        if version in done:
            continue
        for statement in _statements(render_ddl(path, settings)):
            client.command(statement)
        client.insert(f"{db}.{SCHEMA_VERSION_TABLE}", [[version, path.name]], column_names=["version", "name"])
        applied.append(path.name)
    return applied


def _statements(sql: str) -> list[str]:
    without_comments = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    # A statement ends with ";" at the end of a line; a ";" inside a COMMENT '...' string does not end it.
    return [s.strip() for s in re.split(r";[ \t]*(?:\n|$)", without_comments) if s.strip()]


def check_table(client: Any, settings: ClickHouseSettings, table: str) -> None:
    """Refuse to write into a table that is missing, not a ReplacingMergeTree by version, or without dedup."""
    db = _ident(settings.database)
    rows = client.query(
        "SELECT engine, engine_full FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        parameters={"db": db, "t": table},
    ).result_rows
    where = f"{db}.{table} on {settings.dsn}"
    if not rows:
        raise SchemaError(f"table {where} does not exist; apply the schema first: klines schema apply")
    engine, engine_full = rows[0]
    if "ReplacingMergeTree" not in engine or "version" not in engine_full.split("ORDER BY")[0]:
        raise SchemaError(
            f"table {where} must be ReplacingMergeTree(version), found {engine_full.split(' SETTINGS')[0]}"
        )
    window = re.search(r"non_replicated_deduplication_window = (\d+)", engine_full)
    if not engine.startswith("Replicated") and (window is None or int(window.group(1)) == 0):
        raise SchemaError(
            f"table {where} has no non_replicated_deduplication_window: retried inserts would duplicate rows"
        )
    columns = {
        r[0]
        for r in client.query(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String}",
            parameters={"db": db, "t": table},
        ).result_rows
    }
    missing = [c for c in KLINE_COLUMNS if c not in columns]
    if missing:
        raise SchemaError(f"table {where} lacks columns {', '.join(missing)}; apply the schema: klines schema apply")


def kline_row(kline: Any, *, version: int, partition: int, offset: int, token: str) -> tuple[Any, ...]:
    """Build the row for ``kline`` (a :class:`services.core.models.Kline`) in :data:`KLINE_COLUMNS` order."""
    return (
        kline.s,
        kline.i,
        kline.t,
        kline.T,
        kline.f,
        kline.L,
        Decimal(kline.o),
        Decimal(kline.h),
        Decimal(kline.l),
        Decimal(kline.c),
        Decimal(kline.v),
        Decimal(kline.q),
        kline.n,
        Decimal(kline.V),
        Decimal(kline.Q),
        version,
        kline.source,
        partition,
        offset,
        token,
    )


def insert_klines(
    client: Any, settings: ClickHouseSettings, table: str, rows: Sequence[Sequence[Any]], token: str
) -> None:
    """Insert ``rows`` with ``insert_deduplication_token=token``: retrying the same batch adds nothing."""
    if not rows:
        return
    try:
        with _call_lock(client):
            client.insert(
                table,
                rows,
                database=settings.database,
                column_names=list(KLINE_COLUMNS),
                settings={"insert_deduplication_token": token},
            )
    except Exception as exc:  # clickhouse-connect raises many types; the caller retries
        raise ClickHouseUnavailable(f"insert into {settings.database}.{table} failed: {exc}") from exc


def query_rows(client: Any, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    with _call_lock(client):
        return [tuple(r) for r in client.query(sql, parameters=parameters or {}).result_rows]


def table_names(settings: ClickHouseSettings) -> Iterable[str]:
    return (settings.finalized_table, settings.snapshots_table)
