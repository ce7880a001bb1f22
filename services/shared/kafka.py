"""Kafka client factories with safe defaults, topic creation, and reachability checks.

Every producer here is idempotent with ``acks="all"``; every consumer commits manually. Callers own the
clients' lifecycles (``await client.start()`` / ``await client.stop()``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from services.shared.settings import KafkaSettings

log = logging.getLogger(__name__)


class KafkaUnreachable(Exception):
    """The configured bootstrap servers do not answer; the message names them and the setting."""


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def make_producer(settings: KafkaSettings, *, client_suffix: str = "producer", **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer (``acks=all``) with bounded request and delivery timeouts."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap,
        "client_id": f"{settings.client_id}-{client_suffix}",
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_batch_size": 256 * 1024,
        "compression_type": None,
        "request_timeout_ms": settings.request_timeout_ms,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(
    settings: KafkaSettings,
    *topics: str,
    group_id: str | None,
    client_suffix: str = "consumer",
    **overrides: Any,
) -> AIOKafkaConsumer:
    """A consumer with manual commits, reading committed data only, from the earliest offset by default."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap,
        "client_id": f"{settings.client_id}-{client_suffix}",
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "request_timeout_ms": settings.request_timeout_ms,
        "max_poll_interval_ms": 300_000,
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 3_000,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: Mapping[str, str]


def topic_specs(settings: KafkaSettings) -> list[TopicSpec]:
    """The project's topics with their partitions and cleanup policies (snapshots are compacted)."""
    t = settings.topics
    return [
        TopicSpec(t.trades, settings.trades_partitions, {"retention.ms": str(settings.trades_retention_ms)}),
        TopicSpec(t.finalized, settings.klines_partitions, {"retention.ms": str(30 * 24 * 3600 * 1000)}),
        TopicSpec(
            t.snapshots,
            settings.klines_partitions,
            {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1", "segment.ms": "600000"},
        ),
        TopicSpec(t.dead_letter, 1, {"retention.ms": str(30 * 24 * 3600 * 1000)}),
    ]


async def check_reachable(settings: KafkaSettings, timeout_s: float = 10.0) -> None:
    """Raise :class:`KafkaUnreachable` unless a broker answers a metadata request within ``timeout_s``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (TimeoutError, KafkaConnectionError, KafkaError, OSError) as exc:
        raise KafkaUnreachable(
            f"cannot reach Kafka at {settings.bootstrap} within {timeout_s:g}s ({type(exc).__name__}); "
            "check kafka.bootstrap in the config or KAFKA_BOOTSTRAP, or start the local broker with "
            "deploy/kafka/kafka.sh start"
        ) from None
    finally:
        await admin.close()


async def ensure_topics(settings: KafkaSettings, specs: list[TopicSpec] | None = None) -> list[str]:
    """Create the topics that do not exist yet; return the names created. Existing topics are left alone."""
    specs = topic_specs(settings) if specs is None else specs
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=settings.request_timeout_ms)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(s.name, s.partitions, settings.replication_factor, topic_configs=dict(s.config))
            for s in specs
            if s.name not in existing
        ]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # another process created it between list and create: fine
        return [t.name for t in new]
    finally:
        await admin.close()


async def delete_topics(settings: KafkaSettings, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=settings.request_timeout_ms)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        doomed = [n for n in names if n in existing]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()


async def partitions_of(consumer: AIOKafkaConsumer, topic: str, wait_s: float = 10.0) -> set[int]:
    """The partitions of ``topic``, asking the broker again (up to ``wait_s``) while it shows none: a topic just
    created reaches the metadata of every broker connection a moment later. Empty if it never shows any."""
    deadline = time.monotonic() + wait_s
    while True:
        parts: set[int] = consumer.partitions_for_topic(topic) or set()
        if parts or time.monotonic() >= deadline:
            return parts
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
        if parts:
            return parts
        await asyncio.sleep(0.2)


async def _end_offsets(consumer: AIOKafkaConsumer, topic: str) -> dict[Any, int]:
    """The end offset of every partition of ``topic`` (empty if it has none)."""
    from aiokafka import TopicPartition

    tps = [TopicPartition(topic, p) for p in sorted(await partitions_of(consumer, topic, wait_s=2.0))]
    return dict(await consumer.end_offsets(tps)) if tps else {}


async def end_offsets(settings: KafkaSettings, topic: str) -> dict[int, int]:
    """``{partition: end offset}`` of ``topic``: where a consumer that has read everything stands."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        return {tp.partition: offset for tp, offset in (await _end_offsets(consumer, topic)).items()}
    finally:
        await consumer.stop()


async def topic_overview(settings: KafkaSettings) -> list[tuple[str, int, int, str, int | None]]:
    """Per project topic: partitions, messages (sum of end offsets), and per consumer group its total lag."""
    from aiokafka import TopicPartition

    names = [s.name for s in topic_specs(settings)]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=settings.request_timeout_ms)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        existing = set(await admin.list_topics())
        ends: dict[str, dict[TopicPartition, int]] = {}
        for name in names:
            if name in existing:
                ends[name] = await _end_offsets(consumer, name)
        lags: dict[str, list[tuple[str, int]]] = {}
        for group, _protocol in [(g[0], g[1]) for g in await admin.list_consumer_groups()]:
            offsets = await admin.list_consumer_group_offsets(group)
            per_topic: dict[str, int] = {}
            for tp, meta in offsets.items():
                if tp.topic in ends and meta.offset >= 0:
                    per_topic[tp.topic] = per_topic.get(tp.topic, 0) + ends[tp.topic].get(tp, 0) - meta.offset
            for topic, lag in per_topic.items():
                lags.setdefault(topic, []).append((group, lag))
        rows: list[tuple[str, int, int, str, int | None]] = []
        for name in names:
            if name not in ends:
                rows.append((name, 0, 0, "(missing: klines topics create)", None))
                continue
            total = sum(ends[name].values())
            groups: list[tuple[str, int | None]] = list(lags.get(name, [])) or [("-", None)]
            for i, (group, group_lag) in enumerate(sorted(groups, key=lambda g: g[0])):
                first = i == 0
                rows.append(
                    (name if first else "", len(ends[name]) if first else 0, total if first else 0, group, group_lag)
                )
        return rows
    finally:
        await consumer.stop()
        await admin.close()
