"""``python -m services.snapshot_writer [--config FILE]``: run the snapshot writer alone."""

from __future__ import annotations

import sys

from services.writers.service import main

if __name__ == "__main__":
    sys.exit(main(("snapshot",)))
