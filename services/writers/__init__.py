"""The writer services' composition root: both writers in one process, or one of them alone.

``python -m services.writers`` runs ``finalized_writer`` and ``snapshot_writer`` in ONE process sharing the
embedded chDB client (one data directory can be open in one process at a time), still as two consumers in two
consumer groups with two commit loops. ``python -m services.finalized_writer`` / ``python -m
services.snapshot_writer`` run one each (separately deployable, for a ClickHouse server). See
:func:`services.writers.service.serve` for the startup checks, health endpoints and exit codes.
"""

from services.writers.service import WRITER_KINDS, main, serve

__all__ = ["WRITER_KINDS", "main", "serve"]
