"""Terminal output of the ``klines`` command: tables and progress bars.

On a terminal they are drawn by `rich <https://rich.readthedocs.io>`_; anywhere else (a pipe, a file, a test
capturing the output, ``TERM=dumb``) they are plain text that is stable to parse:

* a table is its header, a line of dashes, then one line per row, columns separated by two spaces and padded to
  the widest cell (``awk``, ``column -t`` and the tests read it);
* a progress bar is a line per few seconds and a last line at 100%, never carriage returns.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, TextIO

#: How often the plain progress line is printed (a terminal redraws its bar continuously).
PLAIN_PROGRESS_EVERY_S = 5.0


def is_terminal(out: Any) -> bool:
    """True when ``out`` is an interactive terminal that can take rich's drawing (not ``TERM=dumb``)."""
    isatty = getattr(out, "isatty", None)
    try:
        tty = bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed file
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def cell_text(value: Any) -> str:
    """A value as a table shows it: ``None`` empty, decimals without trailing zeros (``97000.1``)."""
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return decimal_plain(value)
    return str(value)


def decimal_plain(value: Decimal) -> str:
    """``Decimal('97000.100000000000000000')`` -> ``97000.1``; ``Decimal('0E-18')`` -> ``0``; never exponents."""
    if not value.is_finite():
        return str(value)
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None) -> None:
    """``rows`` under ``header``: a rich table on a terminal, plain aligned text elsewhere."""
    out = out or sys.stdout
    cells = [[cell_text(v) for v in row] for row in rows]
    if is_terminal(out):
        _rich_table(header, cells, out)
        return
    lines = [[str(h) for h in header], *cells]
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    for n, row in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _rich_table(header: Sequence[str], cells: Sequence[Sequence[str]], out: TextIO) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    numeric = [bool(cells) and all(_looks_numeric(row[i]) for row in cells if row[i]) for i in range(len(header))]
    for i, name in enumerate(header):
        table.add_column(str(name), justify="right" if numeric[i] else "left", overflow="fold")
    for row in cells:
        table.add_row(*row)
    Console(file=out, highlight=False).print(table)


def _looks_numeric(text: str) -> bool:
    try:
        Decimal(text)
    except ArithmeticError:
        return False
    return True


class Progress:
    """Progress of ``total`` units (``unit``: "trades"), as a rich bar on a terminal or plain lines elsewhere.

    Plain line: ``LABEL [#####...] 42.0% 4200/10000 trades 1,234/s``, printed every
    :data:`PLAIN_PROGRESS_EVERY_S` seconds and once at the end.
    """

    def __init__(self, total: int, label: str, out: TextIO, *, unit: str = "trades") -> None:
        self.total, self.label, self.out, self.unit = max(total, 1), label, out, unit
        self.done = 0
        self._t0 = time.monotonic()
        self._last_line = self._t0
        self._printed_end = False
        self._rich: Any = None
        self._task: Any = None
        if is_terminal(out):
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                MofNCompleteColumn(),
                TextColumn(unit),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=out),
            )
            self._task = self._rich.add_task(label, total=self.total)
            self._rich.start()

    def advance(self, n: int) -> None:
        self.done += n
        if self._rich is not None:
            self._rich.update(self._task, completed=min(self.done, self.total))
            return
        now = time.monotonic()
        if self.done >= self.total and not self._printed_end:
            self._printed_end = True
            self._print_line(now)
        elif now - self._last_line >= PLAIN_PROGRESS_EVERY_S:
            self._print_line(now)

    def _print_line(self, now: float) -> None:
        self._last_line = now
        share = min(1.0, self.done / self.total)
        bar = "#" * int(share * 30)
        rate = self.done / max(now - self._t0, 1e-9)
        print(
            f"{self.label} [{bar:<30}] {share:6.1%} {self.done}/{self.total} {self.unit} {rate:,.0f}/s",
            file=self.out,
            flush=True,
        )

    def finish(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            return
        if not self._printed_end:
            self._printed_end = True
            self._print_line(time.monotonic())
