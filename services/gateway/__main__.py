"""``python -m services.gateway [--config FILE]``: live klines over WebSocket, and the chart page on ``/``."""

from __future__ import annotations

import sys

from services.gateway.server import main

if __name__ == "__main__":
    sys.exit(main())
