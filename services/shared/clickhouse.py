"""The one ClickHouse path: connect, apply and check the versioned schema, and insert kline rows idempotently.

Both writers persist through :func:`insert_klines` (the seed's ``persist_kline_data``). Access goes through
clickhouse-connect only: a server (``http://host:8123``) or the embedded chDB engine (``chdb:///dir``). An
embedded data directory can be open in one process at a time, so a process keeps one client per directory
(:func:`connect` caches it) and shares it between its writers. That client runs chDB in a child process
(:class:`~services.shared.embedded.EmbeddedClient`), where its queries do not hold this process's GIL, unless
``embedded_in_process`` is set.

Rows travel as ``TabSeparated`` text through clickhouse-connect's ``raw_insert``, and ClickHouse parses every
value itself: a decimal is sent as its exact plain text (:func:`decimal_text`) and never becomes a float, and
no Python object is built per value. With the generic ``client.insert`` each ``Decimal`` was converted to
``Decimal128`` in Python, most of an insert's cost. The deduplication token rides in the insert's settings
either way: chDB puts it in the ``INSERT ... FROM INFILE ... SETTINGS`` clause, a server gets it as a URL
parameter, exactly as for ``client.insert``.

clickhouse-connect's client is synchronous (the chDB backend has no async client); async callers run these
functions in a worker thread (``asyncio.to_thread``), one insert at a time per client.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from decimal import Context, Decimal
from pathlib import Path
from typing import Any, overload

import clickhouse_connect

from services.shared.embedded import EmbeddedClient
from services.shared.settings import ClickHouseSettings, ConfigError

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "deploy" / "clickhouse"
SCHEMA_VERSION_TABLE = "schema_version"
#: The first line of a DDL file that manages users and grants: applied on a server only.
ACCESS_MARKER = "-- access: server"
READER_PROFILE = "klines_reader_profile"

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


#: The column order of the text the writers send: the verified text of a decoded record first
#: (:attr:`services.shared.messages.DecodedKline.text`, or :func:`kline_text`), then the integers and provenance.
TEXT_COLUMNS: tuple[str, ...] = (
    "symbol",
    "interval",
    "source",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "taker_buy_volume",
    "taker_buy_quote_volume",
    "open_time",
    "close_time",
    "first_trade_id",
    "last_trade_id",
    "trade_count",
    "version",
    "kafka_partition",
    "kafka_offset",
    "batch_token",
)
_TEXT_ORDER = tuple(KLINE_COLUMNS.index(name) for name in TEXT_COLUMNS)


class SchemaError(Exception):
    """A table is missing or lacks the version/deduplication setup the writers rely on."""


class ClickHouseUnavailable(Exception):
    """ClickHouse could not be reached or refused the request (retryable)."""


class EmbeddedEngineMissing(ConfigError):
    """``clickhouse.dsn`` is ``chdb:...`` but the embedded engine is not installed (the ``klines[embedded]``
    extra: chDB with pyarrow, pandas and numpy, about 0.8 GB, left out of the container image)."""


def require_embedded_engine(settings: ClickHouseSettings) -> None:
    """Raise :class:`EmbeddedEngineMissing`, one line naming the extra and the setting, when ``settings.dsn``
    needs chDB and it cannot be imported."""
    if settings.embedded and importlib.util.find_spec("chdb") is None:
        raise EmbeddedEngineMissing(
            f"clickhouse.dsn is {settings.dsn}, the embedded engine, but chdb is not installed: install the "
            "extra (pip install 'klines[embedded]'), or point clickhouse.dsn (CLICKHOUSE_DSN, --dsn) at a "
            "ClickHouse server such as http://127.0.0.1:8123"
        )


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
    key = settings.dsn if settings.embedded else f"{settings.username}@{settings.dsn}"
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            if settings.embedded:
                require_embedded_engine(settings)
                path = settings.dsn.removeprefix("chdb://")
                if path.startswith("/"):
                    Path(path).mkdir(parents=True, exist_ok=True)
                if settings.embedded_in_process:
                    client = clickhouse_connect.get_client(dsn=settings.dsn)
                else:
                    client = EmbeddedClient(settings.dsn)
            else:
                client = clickhouse_connect.get_client(
                    dsn=settings.dsn,
                    username=settings.username,
                    password=settings.password.get_secret_value(),
                    connect_timeout=10,
                    send_receive_timeout=30,
                )
            _clients[key] = client
        # Only when missing: the writer and reader logins may not CREATE DATABASE, even IF NOT EXISTS.
        exists = client.query(
            "SELECT count() FROM system.databases WHERE name = {db:String}", parameters={"db": settings.database}
        ).result_rows[0][0]
        if not exists:
            client.command(f"CREATE DATABASE IF NOT EXISTS {_ident(settings.database)}")
        return client


def close(settings: ClickHouseSettings) -> None:
    """Close and forget the cached client for ``settings.dsn`` (releases an embedded directory)."""
    key = settings.dsn if settings.embedded else f"{settings.username}@{settings.dsn}"
    with _clients_lock:
        client = _clients.pop(key, None)
    if client is not None:
        client.close()


def _ident(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"{name!r} is not a plain ClickHouse identifier")
    return name


def schema_files() -> list[Path]:
    return sorted(SCHEMA_DIR.glob("[0-9][0-9][0-9]_*.sql"))


def is_access_file(path: Path) -> bool:
    """Whether the DDL file manages users and grants (its first line is :data:`ACCESS_MARKER`)."""
    return path.read_text().startswith(ACCESS_MARKER)


def access_skip_reason(settings: ClickHouseSettings) -> str | None:
    """Why the users and grants cannot be applied with ``settings`` (None: they can)."""
    if settings.embedded:
        return "an embedded chDB directory has no access storage (CREATE USER is refused there)"
    if not (settings.reader_password.get_secret_value() and settings.writer_password.get_secret_value()):
        return "clickhouse.reader_password and clickhouse.writer_password are not both set"
    return None


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def render_ddl(path: Path, settings: ClickHouseSettings) -> str:
    """The file's statements with the settings' names (plain identifiers only) filled in. Passwords appear only
    as their SHA-256 (``IDENTIFIED WITH sha256_hash``): hex, nothing to escape, never the secret itself."""
    return path.read_text().format(
        database=_ident(settings.database),
        finalized_table=_ident(settings.finalized_table),
        snapshots_table=_ident(settings.snapshots_table),
        dedup_window=int(settings.dedup_window),
        reader_profile=READER_PROFILE,
        reader_username=_ident(settings.reader_username),
        writer_username=_ident(settings.writer_username),
        reader_password_sha256=_sha256(settings.reader_password.get_secret_value()),
        writer_password_sha256=_sha256(settings.writer_password.get_secret_value()),
        reader_max_execution_time=int(settings.reader_max_execution_time_s),
        reader_max_result_rows=int(settings.reader_max_result_rows),
    )


def apply_schema(client: Any, settings: ClickHouseSettings) -> list[str]:
    """Apply every DDL file not yet recorded in ``schema_version``; return the names applied.

    A file of users and grants (:func:`is_access_file`) is skipped, and not recorded, while
    :func:`access_skip_reason` gives a reason: on chDB, or before both passwords are set."""
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
        if version in done or (is_access_file(path) and access_skip_reason(settings) is not None):
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


#: ``Decimal(38, 18)``: 18 fraction digits, 20 integer digits.
DECIMAL_SCALE = 18
DECIMAL_INTEGER_DIGITS = 20
_SCALE = Decimal(1).scaleb(-DECIMAL_SCALE)
_EXACT = Context(prec=2 * (DECIMAL_SCALE + DECIMAL_INTEGER_DIGITS))
#: TabSeparated escapes (what ClickHouse unescapes in a text field).
_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"})
Decimals = tuple[str, ...]
"""``o h l c v q V Q`` as exact plain text that fits ``Decimal(38, 18)``."""


def decimal_text(value: Decimal) -> str:
    """``value`` as the plain text ClickHouse parses into ``Decimal(38, 18)`` exactly; ``ValueError`` when the
    column cannot hold it exactly (not finite, more than 20 integer digits, or non-zero digits beyond the 18th
    decimal; extra zeros are dropped)."""
    if not value.is_finite():
        raise ValueError(f"{value} is not a finite decimal")
    if value and value.adjusted() >= DECIMAL_INTEGER_DIGITS:
        raise ValueError(f"{value} has more than {DECIMAL_INTEGER_DIGITS} integer digits")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -DECIMAL_SCALE:
        quantized = value.quantize(_SCALE, context=_EXACT)
        if quantized != value:
            raise ValueError(f"{value} has more than {DECIMAL_SCALE} decimals")
        value = quantized
    return format(value, "f")


def kline_decimals(kline: Any) -> Decimals:
    """A kline's ``o h l c v q V Q`` as :func:`decimal_text`."""
    return (
        decimal_text(kline.o),
        decimal_text(kline.h),
        decimal_text(kline.l),
        decimal_text(kline.c),
        decimal_text(kline.v),
        decimal_text(kline.q),
        decimal_text(kline.V),
        decimal_text(kline.Q),
    )


def kline_text(kline: Any, decimals: Decimals | None = None) -> str:
    """``s i source o h l c v q V Q`` of a validated kline, tab-separated: the start of its row in
    :data:`TEXT_COLUMNS` order, the same as :attr:`~services.shared.messages.DecodedKline.text`."""
    return "\t".join((kline.s, kline.i, kline.source, *(decimals if decimals is not None else kline_decimals(kline))))


def kline_row(
    kline: Any, *, version: int, partition: int, offset: int, token: str, decimals: Decimals | None = None
) -> tuple[Any, ...]:
    """The row for ``kline`` (a :class:`services.core.models.Kline`) in :data:`KLINE_COLUMNS` order. Decimals are
    exact plain text: ``decimals`` when the caller has it already verified (a decoded record's), else
    :func:`kline_decimals`."""
    o, h, low, c, v, q, taker_v, taker_q = decimals if decimals is not None else kline_decimals(kline)
    return (
        kline.s,
        kline.i,
        kline.t,
        kline.T,
        kline.f,
        kline.L,
        o,
        h,
        low,
        c,
        v,
        q,
        kline.n,
        taker_v,
        taker_q,
        version,
        kline.source,
        partition,
        offset,
        token,
    )


KlineEntry = tuple[int, int, Any, int, str]
"""What a writer keeps per row until its batch is inserted: (partition, offset, kline, version, text), ``text``
being :func:`kline_text` or a decoded record's verified :attr:`~services.shared.messages.DecodedKline.text`."""


class KlineRows(Sequence[tuple[Any, ...]]):
    """The rows of one batch of validated klines, all under one ``token``; encodes to ``TabSeparated`` (in
    :data:`TEXT_COLUMNS` order) without building the row tuples, which exist only for whoever indexes or
    iterates (e.g. a test's fake table), in :data:`KLINE_COLUMNS` order.

    Every value is safe as it is: each entry's text passed the kline validation (symbol, interval and source of
    letters, digits and ``_``; plain decimals), the rest are integers; the token is escaped once.
    """

    __slots__ = ("_entries", "token")

    def __init__(self, entries: Sequence[KlineEntry], token: str) -> None:
        self._entries = entries
        self.token = token

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> tuple[Any, ...]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[Any, ...]]: ...

    def __getitem__(self, index: int | slice) -> tuple[Any, ...] | list[tuple[Any, ...]]:
        if isinstance(index, slice):
            return [self._row(e) for e in self._entries[index]]
        return self._row(self._entries[index])

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return (self._row(e) for e in self._entries)

    def _row(self, entry: KlineEntry) -> tuple[Any, ...]:
        partition, offset, kline, version, text = entry
        decimals = tuple(text.split("\t")[3:])
        return kline_row(
            kline, version=version, partition=partition, offset=offset, token=self.token, decimals=decimals
        )

    def tsv(self) -> bytes:
        token = self.token.translate(_TSV_ESCAPES)
        text = "".join(
            [f"{head}\t{k.t}\t{k.T}\t{k.f}\t{k.L}\t{k.n}\t{version}\t{partition}\t{offset}\t{token}\n"
             for partition, offset, k, version, head in self._entries]
        )  # fmt: skip
        # A cheap proof (three passes in C) that no value carried a separator or an escape, which would shift
        # or change columns: only a kline built around validation could.
        n = len(self._entries)
        if (
            text.count("\t") != (len(KLINE_COLUMNS) - 1) * n
            or text.count("\n") != n
            or text.count("\\") != token.count("\\") * n
        ):
            raise ValueError("a kline value contains a tab, a newline or a backslash; it was not validated")
        return text.encode()


def encode_rows(rows: Iterable[Sequence[Any]]) -> bytes:
    """``TabSeparated`` text, in :data:`TEXT_COLUMNS` order, of rows in :data:`KLINE_COLUMNS` order: strings
    escaped, integers as they are, ``Decimal`` as :func:`decimal_text`. Anything else (a float, a bool,
    ``None``) is a ``TypeError``: nothing reaches the table through binary floating point or a guess."""
    if isinstance(rows, KlineRows):
        return rows.tsv()
    lines = []
    for row in rows:
        if len(row) != len(KLINE_COLUMNS):
            raise ValueError(f"a kline row has {len(KLINE_COLUMNS)} values, got {len(row)}")
        lines.append("\t".join(_tsv_value(row[i]) for i in _TEXT_ORDER))
    return "".join(line + "\n" for line in lines).encode()


def _tsv_value(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return value.translate(_TSV_ESCAPES)  # type: ignore[no-any-return]
    if kind is int:
        return str(value)
    if kind is Decimal:
        return decimal_text(value)
    raise TypeError(f"cannot store a {kind.__name__} in a kline column: {value!r:.60}")


def insert_klines(
    client: Any, settings: ClickHouseSettings, table: str, rows: Sequence[Sequence[Any]], token: str
) -> None:
    """Insert ``rows`` with ``insert_deduplication_token=token``: retrying the same batch adds nothing.

    ``rows`` are :data:`KLINE_COLUMNS`-ordered sequences (:func:`kline_row`), or a :class:`KlineRows`, which
    encodes faster. Raises :class:`ClickHouseUnavailable` when ClickHouse refuses or cannot be reached.
    """
    if not rows:
        return
    insert_tsv(client, settings, table, encode_rows(rows), token)


def insert_tsv(client: Any, settings: ClickHouseSettings, table: str, body: bytes, token: str) -> None:
    """Insert ``TabSeparated`` rows in :data:`TEXT_COLUMNS` order with ``insert_deduplication_token=token``."""
    target = f"{_ident(settings.database)}.{_ident(table)}"
    try:
        with _call_lock(client):
            client.raw_insert(
                target,
                TEXT_COLUMNS,
                body,
                settings={"insert_deduplication_token": token},
                fmt="TabSeparated",
            )
    except Exception as exc:  # clickhouse-connect raises many types; the caller retries
        raise ClickHouseUnavailable(f"insert into {target} failed: {exc}") from exc


def query_rows(client: Any, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    with _call_lock(client):
        return [tuple(r) for r in client.query(sql, parameters=parameters or {}).result_rows]


def table_names(settings: ClickHouseSettings) -> Iterable[str]:
    return (settings.finalized_table, settings.snapshots_table)


# --- inserts that ClickHouse parses and checks: INSERT ... SELECT over the text as it was received ---------

#: The text an INSERT ... SELECT puts in a ``throwIf`` message to say "a value breaks the contract": an insert
#: refused with it stored nothing and would be refused again (:class:`ClickHouseRejected`), unlike an outage.
REJECTED_MARKER = "klines: rejected by the kline contract"
#: ``FUNCTION_THROW_IF_VALUE_IS_NON_ZERO``, the code of a ``throwIf`` that fired.
_THROW_IF_CODE = "Code: 395"
#: Squash everything an INSERT ... SELECT reads into one block (rows, bytes): one part, one deduplication token,
#: and a ``throwIf`` on any row fails the insert before anything is written.
_ONE_BLOCK = 1_000_000_000
_ONE_BLOCK_BYTES = 1 << 40


class ClickHouseRejected(Exception):
    """ClickHouse refused an insert because of a value it carries (its ``throwIf`` with :data:`REJECTED_MARKER`
    fired): nothing of it was stored, and the same insert would be refused again, so retrying it is pointless."""


class InsertSelectDenied(ClickHouseRejected):
    """The login may not run an ``INSERT ... SELECT`` over ``input()`` (ClickHouse servers before 26 want the
    ``CREATE TEMPORARY TABLE`` grant for the table function, which the least-privilege writer login does not
    have): nothing was stored, and no such insert will pass with this login; plain inserts still do."""


#: ``ACCESS_DENIED``.
_ACCESS_DENIED_CODE = "Code: 497"


def sql_string(value: str) -> str:
    """``value`` as a single-quoted ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def insert_select_text(
    client: Any,
    settings: ClickHouseSettings,
    statement: str,
    structure: str,
    body: bytes,
    token: str,
) -> None:
    """Run ``statement``, an ``INSERT INTO ... SELECT ... FROM {source}``, over ``body``: ``TabSeparated`` text
    whose columns are ``structure``, with ``insert_deduplication_token=token`` (``{token}`` in the statement
    becomes the token as a string literal, e.g. for a column that records it).

    The text reaches ClickHouse as it is and ClickHouse parses it. With a server, ``{source}`` is
    ``input(structure)`` and ``body`` is the request's data (``INSERT ... SELECT ... FROM input() FORMAT
    TabSeparated``, the way to send data to an INSERT ... SELECT over HTTP). chDB does not feed ``input()`` from
    the text after a query, so there ``{source}`` is ``file(path, TabSeparated, structure)`` over a temporary file
    (what clickhouse-connect's chDB backend does for every insert: ``INSERT ... FROM INFILE``). The statement's
    settings make the insert one block, so it lands whole or not at all, and the token makes a repeat of it
    (a retry, the same statement over the same text) add nothing. ClickHouse does not promise that an insert
    of another kind under the same token (:func:`insert_tsv`) is a repeat: the writers send a batch another
    way only after ClickHouse refused this one, which stored nothing.

    Raises :class:`ClickHouseRejected` when the statement's contract check refused a value,
    :class:`InsertSelectDenied` when the login may not run it, and :class:`ClickHouseUnavailable` for anything
    else (the caller retries).
    """
    clauses = (
        f"insert_deduplication_token = {sql_string(token)}, insert_deduplicate = 1, max_insert_threads = 1, "
        f"min_insert_block_size_rows = {_ONE_BLOCK}, min_insert_block_size_bytes = {_ONE_BLOCK_BYTES}, "
        f"max_insert_block_size = {_ONE_BLOCK}"
    )
    statement = statement.replace("{token}", sql_string(token))
    path: str | None = None
    try:
        if settings.embedded:
            with tempfile.NamedTemporaryFile(prefix="klines-insert-", suffix=".tsv", delete=False) as handle:
                handle.write(body)
                path = handle.name
            source = f"file({sql_string(path)}, 'TabSeparated', {sql_string(structure)})"
            sql = f"{statement.replace('{source}', source)} SETTINGS {clauses}"
            with _call_lock(client):
                client.command(sql)
        else:
            source = f"input({sql_string(structure)})"
            sql = f"{statement.replace('{source}', source)} SETTINGS {clauses} FORMAT TabSeparated"
            with _call_lock(client):
                client.command(sql, data=body, settings={"insert_deduplication_token": token})
    except Exception as exc:  # clickhouse-connect raises many types; see the docstring
        text = str(exc)
        if REJECTED_MARKER in text and _THROW_IF_CODE in text:
            raise ClickHouseRejected(text[:500]) from exc
        if _ACCESS_DENIED_CODE in text:
            raise InsertSelectDenied(text[:500]) from exc
        raise ClickHouseUnavailable(f"insert ... select failed: {text[:1000]}") from exc
    finally:
        if path is not None:
            os.unlink(path)


# --- a fault hook in the client path (tests and chaos runs) --------------------------------------------------


class AnswerLost(ConnectionError):
    """The insert was executed by ClickHouse, but its answer never arrived (a dropped connection, a timeout)."""


class LoseAnswers:
    """A ClickHouse client that forwards every call to the real one, and can lose the answers of inserts.

    After :meth:`lose_next` the next ``count`` inserts (``raw_insert``, ``insert``, or a ``command`` that is an
    ``INSERT``) run on the real client and are stored, then raise :class:`AnswerLost` instead of returning: the
    caller cannot tell a stored insert from a failed one, exactly as when a connection drops after the server
    answered. Nothing about the database is imitated; only the answer is withheld.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._to_lose = 0
        self._lock = threading.Lock()
        #: The insert statements (or tables) whose answers were lost, in order.
        self.lost: list[str] = []

    def lose_next(self, count: int = 1) -> None:
        with self._lock:
            self._to_lose += count

    def _answered(self, what: str) -> None:
        with self._lock:
            if self._to_lose <= 0:
                return
            self._to_lose -= 1
            self.lost.append(what)
        raise AnswerLost(f"the answer to an executed insert was lost: {what[:120]}")

    def command(self, cmd: str, *args: Any, **kwargs: Any) -> Any:
        result = self._client.command(cmd, *args, **kwargs)
        if cmd.lstrip().upper().startswith("INSERT"):
            self._answered(cmd)
        return result

    def raw_insert(self, table: str, *args: Any, **kwargs: Any) -> Any:
        result = self._client.raw_insert(table, *args, **kwargs)
        self._answered(table)
        return result

    def insert(self, table: str, *args: Any, **kwargs: Any) -> Any:
        result = self._client.insert(table, *args, **kwargs)
        self._answered(table)
        return result

    def query(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.query(*args, **kwargs)

    def close(self) -> None:
        self._client.close()
