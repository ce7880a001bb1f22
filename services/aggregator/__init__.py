"""The aggregator service: ``trades`` → Binance-exact klines → ``klines.finalized`` and ``klines.snapshots``.

A Faust app (consumer group, rebalancing, lifecycle) whose fetch loop hands each fetched batch to the engine,
which folds it into :class:`~services.core.book.KlineBooks`, one per owned partition, and never awaits I/O on
that path. A closed kline is handed to the producer the instant it closes, or queued in order when the producer
would make it wait; the engine stops fetching while too much output is in flight (flow control on the input,
never loss on the output). A clock publishes changed in-progress klines and closes quiet ones, and book state is
checkpointed to a compacted topic so a crash, restart or rebalance continues exactly (the numbered recovery
protocol is on :mod:`services.aggregator.engine`).

Modules: :mod:`~services.aggregator.worker` (composition root: Kafka, HTTP, clock, start and stop),
:mod:`~services.aggregator.app` (the Faust app and its batch fetch loop), :mod:`~services.aggregator.faust_seam`
(every private Faust/aiokafka hook, pinned and contract-tested), :mod:`~services.aggregator.engine` (hot path,
ticks, rebalances, the recovery protocol), :mod:`~services.aggregator.decode` (fast path of the ``trades``
contract), :mod:`~services.aggregator.output` and :mod:`~services.aggregator.outbox` (finalized klines,
snapshots and dead letters, in order, never dropped), :mod:`~services.aggregator.sending` (``try_send``),
:mod:`~services.aggregator.checkpointer` and :mod:`~services.aggregator.checkpoint` (steps 4-7 of the recovery
protocol, record format), :mod:`~services.aggregator.state` (per-partition bookkeeping, counters),
:mod:`~services.aggregator.clock` (what "now" means). Run with ``python -m services.aggregator``.
"""
