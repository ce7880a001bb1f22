"""The aggregator service: ``trades`` → Binance-exact klines → ``klines.finalized`` and ``klines.snapshots``.

A Faust app (consumer group, rebalancing, lifecycle) whose batch agent folds each fetched batch of per-symbol
trade batches into :class:`~services.core.book.KlineBooks`, one per owned partition, and never awaits I/O on
that path: a closed kline is handed to the producer the instant it closes (``try_send``; a full buffer is a
``DATA_LOSS`` log and a counter), a global clock publishes changed in-progress klines and closes quiet ones,
and book state is checkpointed per tick to a compacted topic so a crash, restart or rebalance continues
exactly (the numbered recovery protocol is on :mod:`services.aggregator.engine`).

Modules: :mod:`~services.aggregator.app` (Faust app and batch consumer), :mod:`~services.aggregator.engine`
(hot path, clock, checkpoints, restore), :mod:`~services.aggregator.checkpoint` (record format and reader),
:mod:`~services.aggregator.decode` (fast path of the ``trades`` contract), :mod:`~services.aggregator.sending`
(``try_send``), :mod:`~services.aggregator.clock` (injected time), :mod:`~services.aggregator.worker`
(composition root). Run with ``python -m services.aggregator``.
"""
