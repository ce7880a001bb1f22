"""Typed, frozen settings for every service, loaded from the TOML file and the environment.

Sources, strongest first:

1. environment variables ``KLINES_<SECTION>__<KEY>`` (for example ``KLINES_PERSISTENCE__QUEUE_SIZE=10000``),
   plus the conventional ``KAFKA_BOOTSTRAP`` and ``CLICKHOUSE_DSN`` shortcuts;
2. the TOML file named by ``KLINES_CONFIG`` (default ``config/klines.toml`` in the working directory);
3. the defaults below.

A bad value stops the service at start with one line naming the key, where it came from and why it is wrong
(:class:`ConfigError`). Unknown keys are errors too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from services.core.book import DEFAULT_REPAIR_HORIZON_MS
from services.core.intervals import INTERVALS, validate_interval
from services.core.models import SYMBOL_PATTERN
from services.shared.admin import read_token_file

ENV_PREFIX = "KLINES_"
DEFAULT_CONFIG_PATH = Path("config/klines.toml")


class ConfigError(Exception):
    """A setting is missing, unknown or invalid; the message is one actionable line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TopicSettings(_Section):
    trades: str = "trades"
    finalized: str = "klines.finalized"
    snapshots: str = "klines.snapshots"
    dead_letter: str = "klines.dead-letter"


class KafkaSettings(_Section):
    bootstrap: str = "127.0.0.1:9092"
    client_id: str = "klines"
    topics: TopicSettings = TopicSettings()
    trades_partitions: int = Field(default=6, ge=1, le=1024)
    klines_partitions: int = Field(default=6, ge=1, le=1024)
    replication_factor: int = Field(default=1, ge=1, le=16)
    trades_retention_ms: int = Field(default=7 * 24 * 3600 * 1000, ge=-1)
    request_timeout_ms: int = Field(default=30_000, ge=1000)
    send_timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value


class ClickHouseSettings(_Section):
    # chdb:///abs/path, chdb:relative/path (resolved against the working directory), or http(s)://host:port
    dsn: str = "chdb:.state/chdb"
    database: str = "klines"
    username: str = "default"
    password: SecretStr = SecretStr("")
    finalized_table: str = "klines_finalized"
    snapshots_table: str = "klines_snapshots"
    dedup_window: int = Field(default=10_000, ge=1)
    # The least-privilege logins that `klines schema apply` creates on a server (deploy/clickhouse/003_access.sql),
    # when both passwords are set: the writer may INSERT and SELECT the two tables, the reader only SELECT them,
    # read-only (readonly = 2) within the limits below. `username`/`password` are this process's own login: the
    # admin for `klines schema apply`, the writer's pair for the writers, the reader's for the gateway.
    reader_username: str = "klines_reader"
    reader_password: SecretStr = SecretStr("")
    writer_username: str = "klines_writer"
    writer_password: SecretStr = SecretStr("")
    reader_max_execution_time_s: int = Field(default=30, ge=1)
    reader_max_result_rows: int = Field(default=1_000_000, ge=1)
    # chDB only: run the engine inside this process instead of in a child process that owns the directory.
    # In process, a query holds the GIL for parts of its run and a crash of the engine ends the process
    # (services/shared/embedded.py).
    embedded_in_process: bool = False

    @field_validator("dsn")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("chdb:", "http://", "https://")):
            raise ValueError(f"expected chdb:///path, http://host:8123 or https://host:8443, got {value!r}")
        if value.startswith("chdb:") and not value.startswith("chdb://"):
            return "chdb://" + str(Path(value.removeprefix("chdb:")).resolve())
        return value

    @property
    def embedded(self) -> bool:
        return self.dsn.startswith("chdb:")

    def as_reader(self) -> ClickHouseSettings:
        """These settings with the reader's login as this process's own, when ``reader_password`` is set (else
        unchanged: the single login of a setup without the least-privilege users)."""
        if not self.reader_password.get_secret_value():
            return self
        return self.model_copy(update={"username": self.reader_username, "password": self.reader_password})


class PersistenceSettings(_Section):
    """The seed's ``[persistence]`` section, plus the snapshot writer's own pair."""

    queue_size: int = Field(default=5000, gt=0)
    finalized_buffer_size: int = Field(default=20_000, gt=0)
    finalized_flush_interval_ms: int = Field(default=250, gt=0)
    snapshot_buffer_size: int = Field(default=20_000, gt=0)
    snapshot_flush_interval_ms: int = Field(default=1000, gt=0)
    insert_retry_max_s: float = Field(default=5.0, gt=0)
    # aggregator: output records (finalized klines queued or unacknowledged, snapshots and dead letters waiting)
    # above which it stops fetching trades until they drained: flow control on the input, never loss on output.
    max_in_flight: int = Field(default=20_000, gt=0)


class MarketSettings(_Section):
    venue: Literal["spot", "usdm"] = "spot"
    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT")
    discover: bool = False
    quote_asset: str = "USDT"
    intervals: tuple[str, ...] = ("1m", "5m", "30m", "1h", "4h", "1d", "1w")
    ws_url: str = "wss://stream.binance.com:9443"
    rest_url: str = "https://api.binance.com"

    @field_validator("symbols")
    @classmethod
    def _symbols_upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for symbol in value:
            if not symbol.isalnum():
                raise ValueError(f"symbol {symbol!r} must be letters and digits only")
        return tuple(s.upper() for s in value)

    @field_validator("intervals")
    @classmethod
    def _intervals_known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"at least one interval is needed, from {', '.join(INTERVALS)}")
        return tuple(validate_interval(i) for i in value)


class IngestSettings(_Section):
    """``services/ingest``: which shard of the symbol set this process follows (services/ingest/shard.py)."""

    # "i/N": N ingest processes, this one is number i (0 <= i < N) and follows the symbols whose stable hash
    # (SHA-256 of the symbol, mod N) is i. "0/1": one process follows every symbol.
    shard: str = "0/1"
    # A trade more than this past the exchange's time (serverTime, asked again before a trade is rejected) is
    # dead-lettered (category "time") instead of published.
    max_future_skew_ms: int = Field(default=60_000, ge=0)

    @field_validator("shard")
    @classmethod
    def _shard_i_of_n(cls, value: str) -> str:
        match = re.fullmatch(r"\s*([0-9]{1,4})\s*/\s*([0-9]{1,4})\s*", value)
        if match is None:
            raise ValueError(f'expected "i/N" (this process is shard i of N, 0 <= i < N), like "0/2", got {value!r}')
        i, n = int(match[1]), int(match[2])
        if not 1 <= n <= 1024:
            raise ValueError(f"the shard count N must be between 1 and 1024, got {n}")
        if i >= n:
            raise ValueError(f"the shard index i must be below the count N: shards of {n} are 0 to {n - 1}, got {i}")
        return f"{i}/{n}"

    @property
    def shard_index(self) -> int:
        return int(self.shard.partition("/")[0])

    @property
    def shard_count(self) -> int:
        return int(self.shard.partition("/")[2])


class AggregatorSettings(_Section):
    snapshot_interval_ms: int = Field(default=1000, gt=0)
    # "wall": the clock that closes quiet klines is the machine's UTC clock (live Binance).
    # "event": no clock; a kline closes only by a later trade of its symbol, as `klines replay` (replays, any speed).
    clock: Literal["wall", "event"] = "wall"
    grace_ms: int = Field(default=500, ge=0)
    # How long closed klines are kept so that a late trade (a REST backfill after an outage, a redelivery) still
    # corrects them (a new version, source "repaired"); an older trade is dead-lettered with category "late".
    # Memory grows with it: 0.4-0.6 KiB per kept closed kline (DEFAULT_REPAIR_HORIZON_MS has the figures).
    # `klines replay` folds with the same horizon, so pipeline and replay agree.
    repair_horizon_ms: int = Field(default=DEFAULT_REPAIR_HORIZON_MS, ge=0)
    http_port: int = Field(default=8081, ge=0, lt=65536)
    # With a clock that knows the time ("wall"), a trade more than this far past "now" is dead-lettered (category
    # "time"), and so is one older than kafka.trades_retention_ms. At most repair_horizon_ms: an accepted trade
    # ahead of "now" then moves its book no further than the real trades behind it can still correct.
    max_future_skew_ms: int = Field(default=DEFAULT_REPAIR_HORIZON_MS, ge=0)
    # Symbols the aggregator folds; a record for another symbol is dead-lettered (category "symbol"). Empty: any.
    symbols: tuple[str, ...] = ()

    @field_validator("symbols")
    @classmethod
    def _symbols_are_symbols(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for symbol in value:
            if re.fullmatch(SYMBOL_PATTERN, symbol.upper()) is None:
                raise ValueError(f"symbol {symbol!r} must be letters, digits and '_' (at most 40)")
        return tuple(s.upper() for s in value)

    @model_validator(mode="before")
    @classmethod
    def _default_skew_follows_the_horizon(cls, data: Any) -> Any:
        """Unset, the skew is the default or the repair horizon, whichever is shorter."""
        if isinstance(data, dict) and "max_future_skew_ms" not in data and "repair_horizon_ms" in data:
            horizon = data["repair_horizon_ms"]
            if isinstance(horizon, int) and not isinstance(horizon, bool) and 0 <= horizon:
                data = {**data, "max_future_skew_ms": min(DEFAULT_REPAIR_HORIZON_MS, horizon)}
        return data

    @model_validator(mode="after")
    def _skew_within_the_horizon(self) -> AggregatorSettings:
        if self.max_future_skew_ms > self.repair_horizon_ms:
            raise ValueError(
                f"aggregator.max_future_skew_ms ({self.max_future_skew_ms}) must be at most "
                f"aggregator.repair_horizon_ms ({self.repair_horizon_ms}): a trade accepted further ahead would "
                "move its book past where the real trades behind it can still be corrected"
            )
        return self


class GatewaySettings(_Section):
    """``services/gateway``: the WebSocket push of live klines to web clients, and its limits."""

    http_port: int = Field(default=8084, ge=0, lt=65536)  # page, /ws, /stream, /healthz /readyz /metrics
    max_connections: int = Field(default=1000, ge=1)
    max_connections_per_ip: int = Field(default=100, ge=1)
    max_subscriptions: int = Field(default=200, ge=1, le=1024)  # per connection (Binance: 1024)
    max_messages_per_s: float = Field(default=5.0, gt=0)  # incoming control messages per connection (Binance: 5)
    max_message_bytes: int = Field(default=4096, ge=256)
    queue_size: int = Field(default=1024, ge=16)  # pending updates per client after coalescing
    slow_client_timeout_s: float = Field(default=5.0, gt=0)  # an update pending longer disconnects the client
    socket_send_buffer: int = Field(default=131_072, ge=0)  # SO_SNDBUF per client socket; 0 = OS default
    heartbeat_s: float = Field(default=20.0, gt=0)
    # History on subscribe: "auto" reads ClickHouse only when it is a server (an embedded chDB directory opens in
    # one process, and in `klines run` that is the writers'); "on" also opens an embedded directory; "off" never.
    history: Literal["auto", "on", "off"] = "auto"
    history_limit: int = Field(default=500, ge=0, le=5000)  # most klines one subscription may ask for
    recent_klines: int = Field(default=120, ge=0)  # finalized klines kept per key in memory when history is off
    warmup_records: int = Field(default=5000, ge=0)  # records per partition read back at start
    # Origins whose pages may open /ws and /stream ("https://charts.example.com"; "*" for any). Empty: only the
    # page's own origin (Origin host = the request's Host). A request without Origin (not a browser) is allowed.
    allowed_origins: tuple[str, ...] = ()


class ServiceSettings(_Section):
    http_host: str = "127.0.0.1"
    ingest_http_port: int = Field(default=8080, ge=0, lt=65536)
    writers_http_port: int = Field(default=8082, ge=0, lt=65536)
    shutdown_grace_s: float = Field(default=8.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    state_dir: Path = Path(".state")
    # A file holding the bearer token that state-changing endpoints (ingest's POST /symbols) require; "" = none,
    # and then those endpoints answer only when http_host is loopback (services/shared/admin.py).
    admin_token_file: Path | None = None
    # Liveness (/healthz, services/shared/liveness.py): 503 "wedged" when the event loop's heartbeat is older than
    # liveness_loop_stall_s, 503 "stale" when a consumer loop has not polled for liveness_poll_stale_s (above the
    # longest wait without a poll that is no fault: a request to a broker that went away, 30 s). With
    # liveness_port set, a thread also answers /healthz on that port while the loop is blocked; "" = none.
    liveness_loop_stall_s: float = Field(default=10.0, gt=0)
    liveness_poll_stale_s: float = Field(default=60.0, gt=0)
    liveness_port: int | None = Field(default=None, ge=0, lt=65536)

    @field_validator("admin_token_file", "liveness_port", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    def admin_token(self) -> SecretStr | None:
        """The content of ``admin_token_file`` (None when it is not set), read when the service starts serving.

        Raises :class:`ConfigError` naming the key when the file cannot be read or is empty. (Not checked when
        the settings load: every process loads them, and only the one that serves the endpoints has the file.)
        """
        if self.admin_token_file is None:
            return None
        try:
            return read_token_file(self.admin_token_file)
        except ValueError as exc:
            raise ConfigError(f"service.admin_token_file: {exc}") from None


class Settings(BaseSettings):
    """Everything a klines service can be told. One frozen object per process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True, toml_file=None
    )

    kafka: KafkaSettings = KafkaSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    persistence: PersistenceSettings = PersistenceSettings()
    market: MarketSettings = MarketSettings()
    ingest: IngestSettings = IngestSettings()
    aggregator: AggregatorSettings = AggregatorSettings()
    gateway: GatewaySettings = GatewaySettings()
    service: ServiceSettings = ServiceSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = _CONFIG_PATH_IN_USE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)


# The TOML path travels to settings_customise_sources through this one-slot holder: pydantic-settings builds
# the sources from the class, so an argument cannot reach it directly.
_CONFIG_PATH_IN_USE: dict[str, Path | None] = {"path": None}

_SHORTCUTS = {"KAFKA_BOOTSTRAP": ("kafka", "bootstrap"), "CLICKHOUSE_DSN": ("clickhouse", "dsn")}


def config_path(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("KLINES_CONFIG", str(DEFAULT_CONFIG_PATH)))


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Load the settings, or raise :class:`ConfigError` with one line that says what to fix.

    ``path`` defaults to ``$KLINES_CONFIG`` or ``config/klines.toml``; a missing default file is fine (defaults
    apply), a missing explicit file is an error. ``overrides`` are section dicts that win over everything.
    """
    explicit = path is not None or "KLINES_CONFIG" in os.environ
    toml_path = path if path is not None else config_path()
    if not toml_path.exists():
        if explicit:
            raise ConfigError(f"config file {toml_path} does not exist (set KLINES_CONFIG or pass --config)")
        toml_path_in_use: Path | None = None
    else:
        toml_path_in_use = toml_path
    init: dict[str, Any] = {}
    for env_name, (section, key) in _SHORTCUTS.items():
        if os.environ.get(env_name):
            init.setdefault(section, {})[key] = os.environ[env_name]
    for section, values in overrides.items():
        init.setdefault(section, {}).update(values)
    _CONFIG_PATH_IN_USE["path"] = toml_path_in_use
    try:
        return Settings(**init)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, toml_path_in_use)) from None
    except (OSError, ValueError) as exc:  # unreadable file, TOML syntax error
        raise ConfigError(f"config file {toml_path}: {exc}") from None
    finally:
        _CONFIG_PATH_IN_USE["path"] = None


def _describe(exc: ValidationError, toml_path: Path | None) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        env_name = ENV_PREFIX + "__".join(str(part) for part in error["loc"]).upper()
        shortcut = next((name for name, loc in _SHORTCUTS.items() if ".".join(loc) == key), None)
        if env_name in os.environ:
            origin = f"environment variable {env_name}"
        elif shortcut and os.environ.get(shortcut):
            origin = f"environment variable {shortcut}"
        elif toml_path is not None:
            origin = f"config file {toml_path}"
        else:
            origin = "defaults"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against config/klines.toml)"
        value = error.get("input")
        shown = "" if error["type"] == "extra_forbidden" or isinstance(value, dict) else f" = {value!r}"
        problems.append(f"{key}{shown} ({origin}): {message}")
    return "invalid configuration: " + "; ".join(problems)
