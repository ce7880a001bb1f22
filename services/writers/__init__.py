"""The two writers (the seed's ``finalized_writer_task`` and ``snapshot_writer_task``) and everything they share.

``python -m services.writers`` runs ``finalized_writer`` and ``snapshot_writer`` in ONE process sharing the
embedded chDB client (one data directory can be open in one process at a time), still as two consumers in two
consumer groups with two commit loops. ``python -m services.finalized_writer`` / ``python -m
services.snapshot_writer`` run one each (separately deployable, for a ClickHouse server).

One concept per module:

* :mod:`~services.writers.specs`: what tells the two writers apart (topic, table, group, flush policy, version);
* :mod:`~services.writers.engine`: the consume -> buffer -> insert -> commit protocol, once for both;
* :mod:`~services.writers.batch`: a batch and its deduplication token (pure data);
* :mod:`~services.writers.contract`: the kline contract as ClickHouse checks it, so rows need no Python;
* :mod:`~services.writers.ports`: the edges (Kafka consumer, ClickHouse insert, dead letters, clock);
* :mod:`~services.writers.service`: the composition root (startup checks, health endpoints, signals, exit codes).
"""

from services.writers.service import WRITER_KINDS, main, serve

__all__ = ["WRITER_KINDS", "main", "serve"]
