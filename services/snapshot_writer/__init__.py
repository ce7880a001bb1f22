"""``snapshot_writer``: in-progress klines from ``klines.snapshots`` into the ``klines_snapshots`` table.

``python -m services.snapshot_writer`` runs it alone; ``python -m services.writers`` runs it with the finalized
writer in one process. Everything it is made of lives in :mod:`services.writers`: its spec in
:mod:`services.writers.specs`, the engine and its protocol in :mod:`services.writers.engine`.
"""

from __future__ import annotations

from services.writers.specs import SNAPSHOT_COMPONENT as COMPONENT
from services.writers.specs import snapshot_spec, snapshot_version

__all__ = ["COMPONENT", "snapshot_spec", "snapshot_version"]
