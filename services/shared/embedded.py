"""The embedded ClickHouse engine (chDB) in a child process that owns the data directory.

chDB holds the interpreter's GIL for parts of a query: in the process that opened it, an insert slows the other
Python threads (``benchmarks/bench_writers.py`` checks it: a pure-Python loop on the main thread ran at 67-94% of
its speed while another thread inserted, against 77-96% with the engine in a child process). So by default
:func:`services.shared.clickhouse.connect` opens an embedded directory through an :class:`EmbeddedClient`: a child
process (``python -m services.shared.embedded``) opens it with clickhouse-connect's chDB backend and runs the
calls it is sent, one at a time, while the parent only waits on a pipe, without the GIL. A crash of the engine
then ends the child, not the writer, and its memory is not the writer's.

It stands in for the clickhouse-connect client the rest of the code uses: ``command``, ``query`` (a
:class:`QueryRows` with ``result_rows`` and ``column_names``), ``insert``, ``raw_insert`` and ``close``, with
the same arguments and the same exceptions (clickhouse-connect's, raised again in the parent). The data
directory is still open in exactly one process, the child, and every client of the parent shares it.

Lifetime: the child lives as long as its client. It ignores SIGINT and SIGTERM (the parent decides when to
stop: a writer stopping gracefully stores its last batch through the child) and ends when its request pipe
closes: :meth:`EmbeddedClient.close`, or the parent's exit, however abrupt. A child that dies is started again
by the next call, which raises :class:`EmbeddedEngineGone` meanwhile (the writers retry it like any insert that
failed). A directory is locked by the process that opened it; a child waits up to ``open_wait_s`` for a previous
owner (for example the child of a process killed a moment ago) to let it go.

Wire format, both ways: an 8-byte little-endian length, then a pickle. A request is ``(method, args, kwargs)``;
a reply is ``(True, result)`` or ``(False, exception)``. Both ends are this project's code on one machine.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from clickhouse_connect.driver.exceptions import OperationalError

_ROOT = Path(__file__).resolve().parents[2]
_HEADER = struct.Struct("<Q")
#: What a parent may ask the child to run: the client methods this project uses.
METHODS = frozenset({"command", "query", "raw_query", "insert", "raw_insert"})
#: Seconds a child waits for a data directory locked by another process.
OPEN_WAIT_S = 15.0
#: Seconds :meth:`EmbeddedClient.close` waits for the child to close the directory before killing it.
CLOSE_WAIT_S = 30.0


class EmbeddedEngineGone(ConnectionError):
    """The child process running the embedded engine ended or could not start."""


class EmbeddedError(Exception):
    """An error the child could not send as it was (its type and message are in the text)."""


class EmbeddedDirectoryLocked(OperationalError):
    """The data directory stayed held by another process for the whole open wait (a clickhouse-connect error,
    like any other failure to reach ClickHouse)."""


@dataclass(frozen=True, slots=True)
class QueryRows:
    """What the child returns for ``query``: the part of clickhouse-connect's ``QueryResult`` used here."""

    column_names: tuple[str, ...]
    result_rows: list[tuple[Any, ...]]


def _send(stream: IO[bytes], message: Any) -> None:
    _write(stream, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _write(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError
    return pickle.loads(payload)  # noqa: S301 - a private pipe between this process and its own child


class EmbeddedClient:
    """A clickhouse-connect chDB client living in a child process (see the module's docstring).

    Safe to share between threads: calls are serialised, as the engine runs one at a time anyway.
    """

    def __init__(self, dsn: str, *, open_wait_s: float = OPEN_WAIT_S) -> None:
        if not dsn.startswith("chdb:"):
            raise ValueError(f"an embedded client needs a chdb: DSN, got {dsn!r}")
        self.dsn = dsn
        self._open_wait_s = open_wait_s
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._requests: IO[bytes] | None = None
        self._replies: IO[bytes] | None = None
        self._closed = False
        with self._lock:
            self._start()

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def _start(self) -> None:
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(_ROOT), env.get("PYTHONPATH"))))
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(request_read), str(reply_write), self.dsn,
                 str(self._open_wait_s)],
                pass_fds=(request_read, reply_write),
                stdin=subprocess.DEVNULL,
                env=env,
            )  # fmt: skip
        finally:
            os.close(request_read)
            os.close(reply_write)
        self._requests = os.fdopen(request_write, "wb")
        self._replies = os.fdopen(reply_read, "rb")
        try:
            self._exchange(None)  # the child's greeting: the directory is open, or why it is not
        except BaseException:
            self._stop(kill=True)
            raise

    def _exchange(self, request: tuple[str, tuple[Any, ...], dict[str, Any]] | None) -> Any:
        assert self._requests is not None and self._replies is not None
        try:
            if request is not None:
                _send(self._requests, request)
            ok, value = _receive(self._replies)
        except (EOFError, OSError) as exc:
            process = self._process
            self._stop(kill=True)
            code = process.returncode if process is not None else None
            raise EmbeddedEngineGone(
                f"the embedded ClickHouse process for {self.dsn} ended (exit code {code})"
            ) from exc
        if not ok:
            raise value
        return value

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._closed:
                raise EmbeddedEngineGone(f"the embedded client for {self.dsn} is closed")
            if self._process is None:
                self._start()
            return self._exchange((method, args, kwargs))

    def command(self, cmd: str, *args: Any, **kwargs: Any) -> Any:
        return self._call("command", cmd, *args, **kwargs)

    def query(self, query: str, *args: Any, **kwargs: Any) -> QueryRows:
        result: QueryRows = self._call("query", query, *args, **kwargs)
        return result

    def raw_query(self, query: str, *args: Any, **kwargs: Any) -> bytes:
        """The result as ClickHouse formats it (``fmt``, or the query's own ``FORMAT`` clause)."""
        result: bytes = self._call("raw_query", query, *args, **kwargs)
        return result

    def insert(self, table: str, data: Any, *args: Any, **kwargs: Any) -> Any:
        return self._call("insert", table, data, *args, **kwargs)

    def raw_insert(self, table: str, *args: Any, **kwargs: Any) -> Any:
        return self._call("raw_insert", table, *args, **kwargs)

    def close(self) -> None:
        """Let the child close the directory and end; wait for it (killed after ``CLOSE_WAIT_S``)."""
        with self._lock:
            self._closed = True
            self._stop(kill=False)

    def _stop(self, *, kill: bool) -> None:
        for stream in (self._requests, self._replies):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._requests = self._replies = None
        process, self._process = self._process, None
        if process is None:
            return
        if kill and process.poll() is None:
            try:
                process.wait(1.0)  # it is ending already (its pipe closed); else it is stuck
            except subprocess.TimeoutExpired:
                process.kill()
        try:
            process.wait(CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the child ----------------------------------------------------------------------------------------------


def _portable(value: Any) -> Any:
    """A query's result as :class:`QueryRows`; anything else as it is (:func:`_send_result` pickles it)."""
    if hasattr(value, "result_rows") and hasattr(value, "column_names"):
        return QueryRows(tuple(value.column_names), [tuple(row) for row in value.result_rows])
    return value


def _send_result(stream: IO[bytes], value: Any) -> None:
    """Reply with ``value``, or with its text when it does not pickle (pickled once either way)."""
    try:
        payload = pickle.dumps((True, value), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        payload = pickle.dumps((True, repr(value)), protocol=pickle.HIGHEST_PROTOCOL)
    _write(stream, payload)


def _portable_error(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own bytes: can the parent rebuild it?
    except Exception:
        return EmbeddedError(f"{type(exc).__module__}.{type(exc).__name__}: {exc}")
    return exc


def _directory(dsn: str) -> Path:
    """The data directory of a ``chdb:`` DSN (``chdb:///abs/dir`` or ``chdb:dir``)."""
    path = dsn.removeprefix("chdb:")
    return Path(path.removeprefix("//") if path.startswith("///") else path)


def _held_by_another_process(directory: Path) -> bool:
    """Whether another process holds ``directory`` open: ClickHouse takes an exclusive ``flock`` on its
    ``status`` file for as long as it has the directory open, and chDB's error for a locked directory does not
    say so (it reads "Error initializing EmbeddedServer"; the lock is only printed on stderr), so ask the lock."""
    try:
        fd = os.open(directory / "status", os.O_RDONLY)
    except OSError:
        return False  # no status file: nobody has opened the directory yet
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got it
    return False


def _open(dsn: str, wait_s: float) -> Any:
    """Open ``dsn``, first waiting up to ``wait_s`` for a previous owner (a process killed a moment ago, whose
    kernel lock goes with its last descriptor) to let the directory go."""
    import clickhouse_connect

    directory = _directory(dsn)
    started = time.monotonic()
    while _held_by_another_process(directory):
        waited = time.monotonic() - started
        if waited >= wait_s:
            raise EmbeddedDirectoryLocked(
                f"Cannot lock file {directory / 'status'}: the chDB directory {directory} is held by another "
                f"process (waited {waited:.1f} s); one directory can be open in one process at a time"
            )
        time.sleep(0.1)
    return clickhouse_connect.get_client(dsn=dsn)


def serve(requests: IO[bytes], replies: IO[bytes], dsn: str, open_wait_s: float) -> None:
    """The child's loop: open ``dsn``, then run each request until the request pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        client = _open(dsn, open_wait_s)
        # clickhouse-connect imports pandas on its first insert (to test for a DataFrame); pay it now, not
        # during the first batch a writer stores.
        from clickhouse_connect.driver import options

        getattr(options, "pd", None)
    except Exception as exc:
        _send(replies, (False, _portable_error(exc)))
        return
    _send(replies, (True, None))
    calls = {name: getattr(client, name) for name in METHODS}
    try:
        while True:
            try:
                method, args, kwargs = _receive(requests)
            except EOFError:
                return
            try:
                if method not in calls:
                    raise ValueError(f"the embedded engine runs {', '.join(sorted(calls))}, not {method!r}")
                result = _portable(calls[method](*args, **kwargs))
            except Exception as exc:
                _send(replies, (False, _portable_error(exc)))
                continue
            _send_result(replies, result)
    finally:
        client.close()


def main(argv: list[str]) -> None:
    request_fd, reply_fd, dsn, open_wait_s = argv
    with os.fdopen(int(request_fd), "rb") as requests, os.fdopen(int(reply_fd), "wb") as replies:
        try:
            serve(requests, replies, dsn, float(open_wait_s))
        except BrokenPipeError:
            pass  # the parent is gone


if __name__ == "__main__":
    # Run from the module by its name, so that what it pickles (QueryRows, EmbeddedError) is the parent's class.
    from services.shared import embedded

    embedded.main(sys.argv[1:])
