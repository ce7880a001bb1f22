"""``python -m services.writers [--config FILE]``: both writers in one process (embedded mode)."""

from __future__ import annotations

import sys

from services.writers.service import main

if __name__ == "__main__":
    sys.exit(main(("finalized", "snapshot")))
