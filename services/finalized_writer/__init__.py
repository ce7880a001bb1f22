"""``finalized_writer``: closed klines from ``klines.finalized`` into the ``klines_finalized`` table.

``python -m services.finalized_writer`` runs it alone (for a ClickHouse server); ``python -m services.writers``
runs it together with the snapshot writer in one process (embedded chDB). Everything it is made of lives in
:mod:`services.writers`: its spec in :mod:`services.writers.specs`, the engine and its protocol in
:mod:`services.writers.engine`.
"""

from __future__ import annotations

from services.writers.specs import FINALIZED_COMPONENT as COMPONENT
from services.writers.specs import finalized_spec, finalized_version

__all__ = ["COMPONENT", "finalized_spec", "finalized_version"]
