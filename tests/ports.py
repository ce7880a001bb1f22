"""Free TCP ports for the servers a test starts (importable from every test: ``tests/`` is on ``sys.path``).

A port the kernel hands out for ``bind(("127.0.0.1", 0))`` lies in the ephemeral range, where every outgoing
connection (a Kafka client's, for one) also takes its local port: between the test picking such a port and the
server binding it, a client connection may take it ("address already in use", seen in CI). These ports come
from below the ephemeral range instead, and none is handed out twice in one test process.
"""

from __future__ import annotations

import random
import socket

#: Below Linux's default ephemeral range (32768-60999) and clear of the test broker's 29092/29093.
_LOW, _HIGH = 20_000, 29_000
_given: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, outside the ephemeral range, not given before in this process."""
    for _ in range(1000):
        port = random.randrange(_LOW, _HIGH)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {_LOW}-{_HIGH}")
