"""``run_service``: one command line, settings, logging and signal set-up for every service, and one mapping from
how the service ended to the exit code (0 clean stop, 1 crash, 2 startup error with one line on stderr)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

import pytest

from services.shared import clickhouse
from services.shared.kafka import KafkaUnreachable
from services.shared.lifecycle import (
    EXIT_CRASH,
    EXIT_OK,
    EXIT_STARTUP,
    ConfigInvalid,
    DependencyUnreachable,
    SchemaMismatch,
    Shutdown,
    StartupError,
    as_startup_error,
    run_service,
)
from services.shared.settings import ConfigError, Settings

pytestmark = pytest.mark.unit

ServiceBody = Callable[[Settings, Shutdown, argparse.Namespace], Awaitable[int]]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from the repository's config only, and the test runner's logging left alone."""
    for name in list(os.environ):
        if name.startswith("KLINES_") or name in {"KAFKA_BOOTSTRAP", "CLICKHOUSE_DSN"}:
            monkeypatch.delenv(name)
    monkeypatch.setattr("services.shared.lifecycle.setup_logging", lambda *args: None)


def returning(code: int) -> ServiceBody:
    async def body(settings: Settings, shutdown: Shutdown, args: argparse.Namespace) -> int:
        return code

    return body


def raising(exc: BaseException) -> ServiceBody:
    async def body(settings: Settings, shutdown: Shutdown, args: argparse.Namespace) -> int:
        raise exc

    return body


def run(body: ServiceBody, argv: list[str] | None = None) -> int:
    return run_service("fake", body, description="a fake service", argv=argv or [])


@pytest.mark.parametrize("code", [EXIT_OK, EXIT_CRASH])
def test_the_service_s_own_code_is_the_exit_code(code: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(returning(code)) == code
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ConfigInvalid("market.symbols: expected a list"), ConfigInvalid),
        (ConfigError("market.symbols: expected a list"), ConfigInvalid),
        (DependencyUnreachable("cannot reach ClickHouse at http://127.0.0.1:1"), DependencyUnreachable),
        (KafkaUnreachable("cannot reach Kafka at 127.0.0.1:1 within 10s"), DependencyUnreachable),
        (SchemaMismatch("table klines.t is missing; run klines schema apply"), SchemaMismatch),
        (clickhouse.SchemaError("table klines.t is missing; run klines schema apply"), SchemaMismatch),
        (clickhouse.EmbeddedEngineMissing("clickhouse.dsn is chdb://x but chdb is not installed"), ConfigInvalid),
        (StartupError("cannot listen on 127.0.0.1:8084 (gateway.http_port)"), StartupError),
    ],
)
def test_a_startup_error_exits_2_with_one_line_naming_the_service(
    error: Exception, kind: type[StartupError], capsys: pytest.CaptureFixture[str]
) -> None:
    mapped = as_startup_error(error)
    assert type(mapped) is kind and mapped.exit_code == EXIT_STARTUP
    assert run(raising(error)) == EXIT_STARTUP
    assert capsys.readouterr().err == f"fake: {error}\n"


def test_an_unexpected_error_is_a_crash(capsys: pytest.CaptureFixture[str]) -> None:
    assert as_startup_error(RuntimeError("boom")) is None
    assert run(raising(RuntimeError("boom"))) == EXIT_CRASH
    assert not capsys.readouterr().err.startswith("fake: ")


def test_a_bad_setting_exits_2_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "no-port")
    started: list[bool] = []

    async def body(settings: Settings, shutdown: Shutdown, args: argparse.Namespace) -> int:
        started.append(True)
        return 0

    assert run(body) == EXIT_STARTUP
    err = capsys.readouterr().err
    assert err.startswith("fake: ") and err.count("\n") == 1 and "bootstrap" in err
    assert not started


def test_a_missing_config_file_exits_2(tmp_path: os.PathLike[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(returning(0), ["--config", f"{tmp_path}/missing.toml"]) == EXIT_STARTUP
    err = capsys.readouterr().err
    assert err.startswith("fake: ") and err.count("\n") == 1


def test_a_bad_command_line_exits_2() -> None:
    with pytest.raises(SystemExit) as exited:
        run(returning(0), ["--no-such-flag"])
    assert exited.value.code == EXIT_STARTUP


def test_the_service_gets_its_flags_the_settings_and_the_shutdown() -> None:
    seen: dict[str, object] = {}

    async def body(settings: Settings, shutdown: Shutdown, args: argparse.Namespace) -> int:
        seen.update(clock=args.clock, grace=shutdown.grace_s, expected=settings.service.shutdown_grace_s)
        return 0

    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--clock", default=None)

    code = run_service("fake", body, description="d", arguments=arguments, argv=["--clock", "manual"])
    assert code == EXIT_OK
    assert seen["clock"] == "manual" and seen["grace"] == seen["expected"]


def test_sigterm_requests_the_stop_and_a_clean_stop_exits_0() -> None:
    reasons: list[str] = []

    async def body(settings: Settings, shutdown: Shutdown, args: argparse.Namespace) -> int:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(shutdown.wait(), 5)
        reasons.append(shutdown.reason)
        return 0

    assert run(body) == EXIT_OK
    assert reasons == ["SIGTERM"]
