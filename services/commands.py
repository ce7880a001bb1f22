"""The registry of ``klines`` subcommands, and what their modules share.

A module that adds a subcommand decorates the function that configures its arguments with :func:`command`;
``services/cli.py`` imports each such module explicitly (and nothing here imports them), so the command line
is assembled without an import cycle: ``cli -> runner -> commands``, never back to ``cli``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from services.shared.settings import Settings

REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"

Handler = Callable[[argparse.Namespace, Settings], int]
Configure = Callable[[argparse.ArgumentParser], None]

#: ``{name: (configure, one-line help)}`` in registration order (the order ``klines --help`` lists them).
COMMANDS: dict[str, tuple[Configure, str]] = {}


def command(name: str, help_text: str) -> Callable[[Configure], Configure]:
    """Register ``klines NAME``: decorate the function that adds its arguments and sets ``handler``."""

    def wrap(configure: Configure) -> Configure:
        COMMANDS[name] = (configure, help_text)
        return configure

    return wrap
