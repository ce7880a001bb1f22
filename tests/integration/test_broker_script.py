"""The local broker script: idempotent start/stop, stale PID handling, no orphan JVM."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from ports import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"


def jvms_for(state: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"kafka.Kafka {state}"], capture_output=True, text=True).stdout
    return out.split()


def test_start_twice_stop_twice_start_again(tmp_path: Path) -> None:
    port = free_port()
    env = dict(
        os.environ,
        KAFKA_PORT=str(port),
        KAFKA_CONTROLLER_PORT=str(free_port()),
        KLINES_STATE_DIR=str(tmp_path),
        KAFKA_LIBS_DIR=str(REPO / ".state" / "kafka-libs"),
    )

    def run(cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(KAFKA_SH), cmd], env=env, capture_output=True, text=True, timeout=120)

    try:
        first = run("start")
        assert first.returncode == 0, first.stderr
        assert "started" in first.stderr
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        second = run("start")
        assert second.returncode == 0 and "already running" in second.stderr
        assert len(jvms_for(tmp_path)) == 1

        assert run("stop").returncode == 0
        again = run("stop")
        assert again.returncode == 0 and "not running" in again.stderr
        assert jvms_for(tmp_path) == []
        assert run("status").returncode == 1

        # A stale PID file (the broker died without cleaning up) must not block the next start.
        (tmp_path / f"kafka-{port}" / "broker.pid").write_text("999999\n")
        third = run("start")
        assert third.returncode == 0, third.stderr
        assert "stale PID" in third.stderr
        assert run("status").returncode == 0
    finally:
        run("stop")
    assert jvms_for(tmp_path) == []
