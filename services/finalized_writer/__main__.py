"""``python -m services.finalized_writer [--config FILE]``: run the finalized writer alone."""

from __future__ import annotations

import sys

from services.writers.service import main

if __name__ == "__main__":
    sys.exit(main(("finalized",)))
