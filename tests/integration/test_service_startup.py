"""Every service process started the way a deployment starts it (``python -m services.<name>``) with a dependency
that does not answer: it exits 2 within seconds, its last line on stderr naming the server and the setting."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("ingest", "aggregator", "writers", "finalized_writer", "snapshot_writer", "gateway")
#: Interpreter start and imports included, on a busy machine; a refused connection itself fails at once.
BOUND_S = 45.0


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLINES_")}
    env.pop("KLINES_CONFIG", None)
    env.update({"KLINES_SERVICE__LOG_FORMAT": "json", **overrides})
    return env


def _start(name: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], started: float) -> tuple[int, str, float]:
    try:
        _out, err = proc.communicate(timeout=max(1.0, BOUND_S - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{proc.args} did not exit within {BOUND_S:g} s") from None
    return proc.returncode, err, time.monotonic() - started


def _own_lines(name: str, err: str) -> list[str]:
    """The lines the process printed itself (log records are JSON objects)."""
    return [line for line in err.splitlines() if line.startswith(f"{name}: ")]


def test_every_service_exits_2_naming_an_unreachable_kafka() -> None:
    env = _env(KAFKA_BOOTSTRAP="127.0.0.1:1")
    started = time.monotonic()
    procs = {name: _start(name, env) for name in SERVICES}  # side by side: the bound is per process
    for name, proc in procs.items():
        code, err, seconds = _finish(proc, started)
        lines = err.strip().splitlines()
        assert code == 2, f"{name} exited {code}:\n{err}"
        assert _own_lines(name, err) == [lines[-1]], err
        assert lines[-1].startswith(f"{name}: cannot reach Kafka at 127.0.0.1:1 "), lines[-1]
        assert "kafka.bootstrap" in lines[-1] and "KAFKA_BOOTSTRAP" in lines[-1]
        assert seconds < BOUND_S


def test_a_writer_exits_2_naming_an_unreachable_clickhouse(kafka_bootstrap: str) -> None:
    """Kafka answers (the session's broker), ClickHouse does not: the line names ClickHouse, not Kafka."""
    env = _env(KAFKA_BOOTSTRAP=kafka_bootstrap, CLICKHOUSE_DSN="http://127.0.0.1:1")
    code, err, seconds = _finish(_start("finalized_writer", env), time.monotonic())
    lines = err.strip().splitlines()
    assert code == 2, err
    assert _own_lines("finalized_writer", err) == [lines[-1]], err
    assert lines[-1].startswith("finalized_writer: cannot reach ClickHouse at http://127.0.0.1:1 "), lines[-1]
    assert "clickhouse.dsn" in lines[-1]
    assert seconds < BOUND_S


def test_a_bad_setting_exits_2_naming_the_key() -> None:
    code, err, _seconds = _finish(_start("gateway", _env(KLINES_GATEWAY__HTTP_PORT="not-a-port")), time.monotonic())
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("gateway: ") and "gateway.http_port" in err, err
