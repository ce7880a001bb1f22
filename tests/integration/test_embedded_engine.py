"""The embedded engine (chDB) in a child process: the same client calls and errors, and a child that lives
exactly as long as it should (it outlives signals meant for its parent, not its parent)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from services.shared import clickhouse
from services.shared.embedded import EmbeddedClient, EmbeddedDirectoryLocked, EmbeddedEngineGone, QueryRows
from services.shared.settings import load_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[EmbeddedClient]:
    engine = EmbeddedClient(f"chdb://{tmp_path / 'chdb'}")
    yield engine
    engine.close()


def _alive(pid: int) -> bool:
    """Running (a zombie, ended but not yet reaped by its parent, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still runs after {seconds}s")
        time.sleep(0.05)


def test_calls_run_in_a_child_process_with_clickhouse_connects_results(client: EmbeddedClient) -> None:
    assert client.pid is not None and client.pid != os.getpid()
    client.command("CREATE DATABASE IF NOT EXISTS e")
    client.command("CREATE TABLE e.t (k UInt32, s String, d Decimal(38, 18)) ENGINE = MergeTree ORDER BY k")
    client.insert("e.t", [[1, "a\tb", "1.5"]], column_names=["k", "s", "d"])
    client.raw_insert("e.t", ["k", "s", "d"], b"2\tc\t0.000000000000000001\n", fmt="TabSeparated")
    result = client.query("SELECT k, s, toString(d) AS d FROM e.t WHERE k >= {low:UInt32} ORDER BY k",
                          parameters={"low": 1})  # fmt: skip
    assert isinstance(result, QueryRows)
    assert result.column_names == ("k", "s", "d")
    assert result.result_rows == [(1, "a\tb", "1.5"), (2, "c", "0.000000000000000001")]
    assert client.command("SELECT count() FROM e.t") == 2


def test_a_database_error_comes_back_as_clickhouse_connects_own(client: EmbeddedClient) -> None:
    with pytest.raises(DatabaseError, match=r"UNKNOWN_TABLE|does not exist"):
        client.query("SELECT * FROM nowhere.missing")
    assert client.command("SELECT 1") == 1  # the engine is still there


def test_only_the_client_calls_are_run(client: EmbeddedClient) -> None:
    with pytest.raises(ValueError, match="not 'close'"):
        client._call("close")


def test_the_child_ignores_the_signals_meant_for_its_parent(client: EmbeddedClient) -> None:
    # Ctrl-C reaches the whole process group; the writers' graceful stop still needs the engine to store the
    # last batch, so only the parent decides when the child ends.
    assert client.pid is not None
    os.kill(client.pid, signal.SIGINT)
    os.kill(client.pid, signal.SIGTERM)
    time.sleep(0.3)
    assert client.command("SELECT 2") == 2


def test_a_child_that_died_is_replaced_by_the_next_call(client: EmbeddedClient) -> None:
    client.command("CREATE DATABASE IF NOT EXISTS e")
    client.command("CREATE TABLE e.kept (k UInt32) ENGINE = MergeTree ORDER BY k")
    client.command("INSERT INTO e.kept VALUES (7)")
    first = client.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    _wait_gone(first)
    with pytest.raises(EmbeddedEngineGone, match="ended"):
        client.command("SELECT 1")
    assert client.command("SELECT sum(k) FROM e.kept") == 7  # a new child, the same directory
    assert client.pid not in (None, first)


def test_close_releases_the_directory_and_refuses_later_calls(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'chdb'}"
    engine = EmbeddedClient(dsn)
    engine.command("CREATE DATABASE IF NOT EXISTS e")
    pid = engine.pid
    assert pid is not None
    engine.close()
    _wait_gone(pid)
    with pytest.raises(EmbeddedEngineGone, match="closed"):
        engine.command("SELECT 1")
    again = EmbeddedClient(dsn, open_wait_s=0)  # nobody holds the directory any more
    assert again.command("SELECT count() FROM system.databases WHERE name = 'e'") == 1
    again.close()


def test_a_locked_directory_is_a_clear_error_after_the_wait(client: EmbeddedClient) -> None:
    client.command("SELECT 1")
    started = time.monotonic()
    with pytest.raises(EmbeddedDirectoryLocked, match=r"Cannot lock file .*held by another process \(waited 0\.[5-9]"):
        EmbeddedClient(client.dsn, open_wait_s=0.5)
    assert time.monotonic() - started >= 0.5


def test_a_directory_let_go_during_the_wait_is_opened(tmp_path: Path) -> None:
    """The wait is real: chDB's own error for a locked directory does not say "lock", so the child asks the
    directory's ``status`` file lock itself, and opens the directory once its previous owner lets it go."""
    dsn = f"chdb://{tmp_path / 'chdb'}"
    holder = EmbeddedClient(dsn)
    holder.command("CREATE DATABASE IF NOT EXISTS e")
    closer = threading.Timer(1.5, holder.close)
    closer.start()
    started = time.monotonic()
    try:
        successor = EmbeddedClient(dsn, open_wait_s=30)
    finally:
        closer.join()
    assert time.monotonic() - started >= 1.5
    assert successor.command("SELECT count() FROM system.databases WHERE name = 'e'") == 1
    successor.close()


def test_the_child_ends_with_its_parent_even_when_the_parent_is_killed(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'chdb'}"
    script = (
        "import sys, time\n"
        "from services.shared.embedded import EmbeddedClient\n"
        f"c = EmbeddedClient({dsn!r})\n"
        "c.command('CREATE DATABASE IF NOT EXISTS survived')\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait(10)
        _wait_gone(child_pid)  # its request pipe closed: it closed the directory and ended
    finally:
        parent.kill()
    engine = EmbeddedClient(dsn)  # the directory is free again, with what was written
    assert engine.command("SELECT count() FROM system.databases WHERE name = 'survived'") == 1
    engine.close()


def test_connect_runs_the_engine_in_a_child_unless_told_otherwise(tmp_path: Path) -> None:
    child = load_settings(clickhouse={"dsn": f"chdb://{tmp_path / 'a'}"}).clickhouse
    inside = load_settings(clickhouse={"dsn": f"chdb://{tmp_path / 'b'}", "embedded_in_process": True}).clickhouse
    try:
        assert isinstance(clickhouse.connect(child), EmbeddedClient)
        in_process = clickhouse.connect(inside)
        assert not isinstance(in_process, EmbeddedClient)
        assert isinstance(in_process, type(clickhouse_connect.get_client(dsn=inside.dsn)))
    finally:
        clickhouse.close(child)
        clickhouse.close(inside)
