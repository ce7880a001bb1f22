"""The ``klines`` command line, without a broker or a database: global options anywhere, ``--version``, the
``tail`` offsets and filters, ``sql``'s FORMAT detection and query input, and the plain output of tables and
progress bars that pipes and tests read."""

from __future__ import annotations

import argparse
import io
import json
import os
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path

import pytest

from services import cli
from services.commands import COMMANDS
from services.console import Progress, decimal_plain, print_table
from services.shared import clickhouse
from services.shared.settings import load_settings

pytestmark = pytest.mark.unit


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# --- global options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["-b", "h:1", "--dsn", "http://c:8123", "--config", "x.toml", "topics"],
        ["topics", "-b", "h:1", "--dsn", "http://c:8123", "--config", "x.toml"],
        ["--bootstrap", "h:1", "topics", "--dsn", "http://c:8123", "--config", "x.toml"],
        ["--config", "x.toml", "topics", "create", "--bootstrap=h:1", "--dsn=http://c:8123"],
    ],
)
def test_global_options_before_or_after_the_subcommand(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)
    assert (args.bootstrap, args.dsn, args.config) == ("h:1", "http://c:8123", Path("x.toml"))
    assert args.command == "topics"


def test_global_options_absent_and_the_later_one_wins() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["sql", "SELECT 1"])
    assert (args.bootstrap, args.dsn, args.config) == (None, None, None)
    args = parser.parse_args(["-b", "first:1", "tail", "trades", "-b", "second:2"])
    assert args.bootstrap == "second:2"


def test_every_subcommand_takes_the_global_options() -> None:
    parser = cli.build_parser()
    required = {"broker": ["status"], "schema": ["check"], "tail": ["trades"], "sql": ["SELECT 1"]}
    required |= {"replay": ["f.csv"], "tape": ["out"]}
    assert {"run", "broker", "schema", "topics", "tail", "sql", "replay", "verify", "tape"} <= set(COMMANDS)
    for name in COMMANDS:
        args = parser.parse_args([name, *required.get(name, []), "-b", "h:9", "--dsn", "chdb:d"])
        assert (args.bootstrap, args.dsn) == ("h:9", "chdb:d"), name


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"klines {version('klines')}"


def test_global_options_reach_the_settings_and_are_undone_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.setenv("CLICKHOUSE_DSN", "http://before:8123")
    seen = {}

    def handler(args: argparse.Namespace, settings: object) -> int:
        seen["settings"] = settings
        seen["env"] = (os.environ.get("KAFKA_BOOTSTRAP"), os.environ.get("CLICKHOUSE_DSN"))
        return 0

    monkeypatch.setattr(cli, "_topics", handler)
    monkeypatch.setitem(COMMANDS, "topics", (lambda p: p.set_defaults(handler=handler), "test"))
    assert cli.main(["topics", "-b", "opt:9093", "--dsn", "http://opt:8123"]) == 0
    assert seen["env"] == ("opt:9093", "http://opt:8123")  # what `klines run` hands the processes it starts
    settings = seen["settings"]
    assert settings.kafka.bootstrap == "opt:9093"  # type: ignore[attr-defined]
    assert settings.clickhouse.dsn == "http://opt:8123"  # type: ignore[attr-defined]
    assert "KAFKA_BOOTSTRAP" not in os.environ and os.environ["CLICKHOUSE_DSN"] == "http://before:8123"


def test_a_bad_global_option_is_named_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topics", "-b", "no-port"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "kafka.bootstrap = 'no-port' (-b/--bootstrap)" in err


# --- tail ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "first", "end", "expected"),
    [
        ("beginning", 5, 100, 5),
        ("earliest", 5, 100, 5),
        ("end", 5, 100, 100),
        ("42", 5, 100, 42),
        ("2", 5, 100, 5),  # before the first retained offset: the first
        ("500", 5, 100, 100),  # past the end: the end
        ("-10", 5, 100, 90),
        ("-1000", 5, 100, 5),
    ],
)
def test_tail_start_offsets(text: str, first: int, end: int, expected: int) -> None:
    assert cli.parse_start_offset(text).resolve(first, end) == expected


@pytest.mark.parametrize("text", ["", "soon", "+3", "1.5", "--2"])
def test_tail_rejects_other_offsets(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_start_offset(text)


def test_tail_options_parse_like_kcat() -> None:
    args = cli.build_parser().parse_args(["tail", "finalized", "-p", "2", "-o", "-5", "-e", "--format", "pretty"])
    assert (args.partition, args.offset, args.exit_at_end, args.format) == (
        2,
        cli.StartOffset("from_end", 5),
        True,
        "pretty",
    )
    defaults = cli.build_parser().parse_args(["tail", "trades"])
    assert (defaults.partition, defaults.offset, defaults.exit_at_end, defaults.format) == (
        None,
        cli.StartOffset("end"),
        False,
        "json",
    )


@pytest.mark.parametrize(
    ("key", "symbol", "interval", "shown"),
    [
        ("ETH", "ETH", None, True),
        ("ETHBTC", "ETH", None, False),
        ("ETH|1m", "eth", None, True),
        ("ETHBTC|1m", "ETH", None, False),
        ("ETH|1m", "ETH", "1m", True),
        ("ETH|1M", "ETH", "1m", False),
        ("ETH|15m", None, "5m", False),
        ("ETH", None, "1m", False),
        ("", "ETH", None, False),
    ],
)
def test_tail_filters_match_exactly(key: str, symbol: str | None, interval: str | None, shown: bool) -> None:
    assert cli.key_matches(key, symbol, interval) is shown


def test_tail_json_lines_and_pretty() -> None:
    line = cli.tail_line("klines.finalized", 3, 17, 1741046580000, "TRXUSDT|1m", b'{"o":"0.2417","n":501}')
    assert json.loads(line) == {
        "topic": "klines.finalized",
        "partition": 3,
        "offset": 17,
        "timestamp": 1741046580000,
        "key": "TRXUSDT|1m",
        "value": {"o": "0.2417", "n": 501},
    }
    assert "\n" not in line
    garbage = json.loads(cli.tail_line("trades", 0, 1, None, None, b"\xffnot json"))
    assert garbage["value"] == "\ufffdnot json" and garbage["key"] is None
    assert json.loads(cli.tail_line("t", 0, 2, None, "k", None))["value"] is None
    pretty = cli.tail_pretty(line).splitlines()
    assert pretty[0] == "klines.finalized[3]@17  TRXUSDT|1m  2025-03-04T00:03:00.000+00:00"
    assert pretty[1:] == ["  {", '    "o": "0.2417",', '    "n": 501', "  }"]


# --- sql -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "fmt"),
    [
        ("SELECT 1 FORMAT JSONEachRow", "JSONEachRow"),
        ("select 1 format csv;", "csv"),
        ("SELECT 1\nFORMAT TSVWithNames  -- with names\n", "TSVWithNames"),
        ("SELECT 1 FORMAT Vertical SETTINGS max_threads = 1", "Vertical"),
        ("SELECT 1 /* FORMAT JSON */", None),
        ("SELECT 1 -- FORMAT JSON", None),
        ("SELECT format AS f FROM t", None),
        ("SELECT formatDateTime(now(), '%F') AS d", None),
        ("SELECT 1", None),
    ],
)
def test_sql_finds_the_query_s_own_format(query: str, fmt: str | None) -> None:
    assert cli.query_format(query) == fmt


def test_sql_reads_the_query_from_stdin() -> None:
    assert cli.read_query(None, io.StringIO("SELECT 1;\n")) == "SELECT 1"
    assert cli.read_query("-", io.StringIO("  SELECT 2  ")) == "SELECT 2"
    assert cli.read_query("SELECT 3;", io.StringIO("ignored")) == "SELECT 3"
    with pytest.raises(cli.UsageError, match="no query"):
        cli.read_query(None, Terminal())
    with pytest.raises(cli.UsageError, match="empty"):
        cli.read_query("-", io.StringIO(" ; "))


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("97000.100000000000000000", "97000.1"),
        ("97000.000000000000000000", "97000"),
        ("0E-18", "0"),
        ("-0.000000000000000000", "0"),
        ("0.000000010000000000", "0.00000001"),
        ("1E+3", "1000"),
        ("-12.50", "-12.5"),
    ],
)
def test_decimals_print_without_trailing_zeros(value: str, text: str) -> None:
    assert decimal_plain(Decimal(value)) == text


# --- tables and progress -------------------------------------------------------------------------------------


def test_plain_table_for_pipes() -> None:
    out = io.StringIO()
    print_table(["symbol", "close", "n"], [("BTCUSDT", Decimal("97000.100000000000000000"), 5), ("ETH", None, 12)], out)
    assert out.getvalue().splitlines() == [
        "symbol   close    n",
        "-------  -------  --",
        "BTCUSDT  97000.1  5",
        "ETH               12",
    ]


def test_rich_table_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    out = Terminal()
    print_table(["symbol", "close"], [("BTCUSDT", Decimal("97000.100000000000000000"))], out)
    text = out.getvalue()
    assert "BTCUSDT" in text and "97000.1" in text and "97000.10" not in text
    assert "-------  -------" not in text  # drawn by rich, not the plain layout
    monkeypatch.setenv("TERM", "dumb")
    dumb = Terminal()
    print_table(["symbol"], [("BTCUSDT",)], dumb)
    assert dumb.getvalue().splitlines() == ["symbol", "-------", "BTCUSDT"]


def test_plain_progress_prints_lines_not_carriage_returns() -> None:
    out = io.StringIO()
    progress = Progress(10, "f.csv (BTCUSDT)", out)
    for _ in range(10):
        progress.advance(1)
    progress.finish()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 1 and lines[0].startswith(
        "f.csv (BTCUSDT) [##############################] 100.0% 10/10 trades"
    )


def test_rich_progress_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    out = Terminal()
    progress = Progress(4, "f.csv", out)
    progress.advance(4)
    progress.finish()
    assert "f.csv" in out.getvalue() and "4/4" in out.getvalue()


# --- the embedded engine is an extra ---------------------------------------------------------------------------


def test_a_chdb_dsn_without_chdb_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = clickhouse.importlib.util.find_spec
    monkeypatch.setattr(
        clickhouse.importlib.util, "find_spec", lambda name, *a: None if name == "chdb" else real(name, *a)
    )
    settings = load_settings(clickhouse={"dsn": f"chdb://{tmp_path / 'ch'}"})
    with pytest.raises(clickhouse.EmbeddedEngineMissing, match=r"klines\[embedded\]"):
        clickhouse.connect(settings.clickhouse)
    assert not (tmp_path / "ch").exists()
    clickhouse.require_embedded_engine(load_settings(clickhouse={"dsn": "http://127.0.0.1:8123"}).clickhouse)


def test_the_command_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = clickhouse.importlib.util.find_spec
    monkeypatch.setattr(
        clickhouse.importlib.util, "find_spec", lambda name, *a: None if name == "chdb" else real(name, *a)
    )
    assert cli.main(["sql", "SELECT 1", "--dsn", f"chdb://{tmp_path / 'ch'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("klines: clickhouse.dsn is chdb://")
    assert "pip install 'klines[embedded]'" in err and "CLICKHOUSE_DSN" in err
