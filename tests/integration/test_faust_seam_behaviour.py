"""The Faust seam's behaviour with a running app and the real broker (:mod:`services.aggregator.faust_seam`).

One :class:`SeamApp` with a fetch loop that only records what it is given, on a topic of 3 partitions, checked
step by step; every failure names the hook (numbered as in the seam's docstring) whose behaviour changed:

1. the app builds the seam's transport and consumer (hook 1);
2. Faust's fetcher runs the app's fetch loop with a session (hook 2) and the rebalance signal reports the
   assignment;
3. the session's fetch returns every record, raw bytes, per partition in offset order (hook 3);
4. the group member reads the assignment and high watermarks, commits an offset the group then holds (hooks 5
   and 6), and seeks back to an offset and to the beginning, after which the records come again (hook 5);
5. while the flow is stopped the fetch waits, and a record produced meanwhile arrives once it resumes (hook 3);
6. stopping the app stops the session and ends the loop (hook 4).

The signatures and the pin: ``tests/unit/test_faust_seam.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.aggregator.faust_seam import FetchSession, GroupMember, SeamApp, SeamConsumer, SeamTransport, on_rebalance
from services.shared.kafka import make_producer
from services.shared.settings import Settings

pytestmark = pytest.mark.integration

PARTITIONS = 3
PER_PARTITION = 10


async def wait_until(condition: Callable[[], bool], hook: str, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"faust {hook}: {what} (waited {timeout_s:.0f} s)")
        await asyncio.sleep(0.05)


async def test_the_faust_hooks_behave_as_the_seam_relies_on(settings: Settings, tmp_path: Path) -> None:
    kafka = settings.kafka
    topic = kafka.topics.trades
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    producer = make_producer(kafka)
    await producer.start()
    try:
        for p in range(PARTITIONS):
            for k in range(PER_PARTITION):
                await producer.send_and_wait(topic, f"value-{p}-{k}".encode(), key=b"K", partition=p)
    finally:
        await producer.stop()

    group = f"{topic}-seam"
    app = SeamApp(
        group,
        broker=f"kafka://{kafka.bootstrap}",
        store="memory://",
        datadir=str(tmp_path / "faust"),
        autodiscover=False,
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        stream_recovery_delay=0.0,
        stream_wait_empty=False,
    )
    sessions: list[FetchSession] = []
    received: dict[TopicPartition, list[int]] = defaultdict(list)
    values: list[bytes] = []
    loop_ended = asyncio.Event()

    async def fetch_loop(session: FetchSession) -> None:
        sessions.append(session)
        try:
            while not session.stopped():
                for tp, records in (await session.next_records(0.5)).items():
                    received[TopicPartition(tp.topic, tp.partition)].extend(record.offset for record in records)
                    values.extend(record.value for record in records)
        except asyncio.CancelledError:
            if not session.app_stopping:
                raise
        finally:
            loop_ended.set()

    assigned: list[set[TopicPartition]] = []
    revoked: list[set[TopicPartition]] = []

    async def on_assigned(partitions: set[TopicPartition]) -> None:
        assigned.append(partitions)

    async def on_revoked(partitions: set[TopicPartition]) -> None:
        revoked.append(partitions)

    app.fetch_loop = fetch_loop
    app.fetch_max_bytes = 3 * 1024 * 1024
    app.topics.add(app.topic(topic, acks=False, key_serializer="raw", value_serializer="raw"))
    on_rebalance(app, on_revoked, on_assigned)
    await app.start()
    stopped = False
    try:
        # 1.
        assert isinstance(app.transport, SeamTransport), "faust hook 1 App._new_transport: not the seam's transport"
        assert isinstance(app.consumer, SeamConsumer), "faust hook 1 App._new_transport: not the seam's consumer"
        fetcher = app.consumer._thread._ensure_consumer()._fetcher
        assert fetcher is not None and fetcher._fetch_max_bytes == 3 * 1024 * 1024, (
            "faust hook 7 _create_worker_consumer: the running aiokafka fetcher does not use SeamApp.fetch_max_bytes"
        )
        # 2.
        await wait_until(lambda: bool(sessions), "hook 2 Consumer._drain_messages", "the fetch loop never ran")
        session = sessions[0]
        assert not session.stopped(), "mode hook 4 Service._stopped: set while the consumer runs"
        await wait_until(
            lambda: bool(assigned) and set().union(*assigned) >= set(tps),
            "signal on_partitions_assigned",
            f"never reported the assignment of {tps} (got {assigned})",
        )
        # 3.
        await wait_until(
            lambda: sum(map(len, received.values())) >= PARTITIONS * PER_PARTITION,
            "hook 3 Consumer._wait_next_records",
            f"returned {sum(map(len, received.values()))} of {PARTITIONS * PER_PARTITION} records",
        )
        assert {tp: received[tp] for tp in tps} == {tp: list(range(PER_PARTITION)) for tp in tps}, (
            "faust hook 3 Consumer._wait_next_records: records missing, repeated or out of order"
        )
        assert sorted(values) == sorted(f"value-{p}-{k}".encode() for p in range(PARTITIONS) for k in range(10)), (
            "faust hook 3 Consumer._wait_next_records: the values are not the raw bytes sent"
        )
        assert session.flow_active and not session.should_stop, "faust public Consumer.flow_active/should_stop"
        # 4.
        member = GroupMember(app)
        assert member.assignment() == set(tps), "faust hook 5 thread.assignment: not the partitions assigned"
        assert [member.highwater(tp) for tp in tps] == [PER_PARTITION] * PARTITIONS, "faust public highwater"
        await member.commit({tps[0]: 4, tps[1]: 7})
        reader = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group, enable_auto_commit=False)
        await reader.start()
        try:
            committed = [await reader.committed(tp) for tp in tps[:2]]
        finally:
            await reader.stop()
        assert committed == [4, 7], f"faust hook 6 thread._ensure_consumer().commit: the group holds {committed}"
        received.clear()
        await member.seek(tps[0], 7)
        await wait_until(
            lambda: received[tps[0]] == [7, 8, 9], "hook 5 thread.seek_wait", f"after a seek to 7: {received}"
        )
        received.clear()
        await member.seek(tps[2], None)
        await wait_until(
            lambda: received[tps[2]] == list(range(PER_PARTITION)),
            "hook 5 thread.seek_to_beginning",
            f"after a seek to the beginning: {received}",
        )
        # 5.
        app.consumer.stop_flow()
        assert not session.flow_active, "faust public Consumer.stop_flow: the session still sees the flow active"
        await asyncio.sleep(1.5)  # a fetch that passed the flow check before the stop returns meanwhile
        received.clear()
        producer = make_producer(kafka)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"late", key=b"K", partition=1)
        finally:
            await producer.stop()
        await asyncio.sleep(1.5)
        assert not received, f"faust hook 3 Consumer._wait_next_records: fetched while the flow was stopped: {received}"
        resumed = asyncio.ensure_future(session.wait_flow_resumed())
        await asyncio.sleep(0.2)
        assert not resumed.done(), "faust public Consumer.can_resume_flow: set while the flow is stopped"
        app.consumer.resume_flow()
        await asyncio.wait_for(resumed, 5)
        await wait_until(
            lambda: received[tps[1]] == [PER_PARTITION],
            "hook 3 Consumer._wait_next_records",
            f"the record produced while the flow was stopped did not come once it resumed: {received}",
        )
        # 6.
        await asyncio.wait_for(app.stop(), 30)
        stopped = True
        assert session.stopped(), "mode hook 4 Service._stopped: not set once the app stopped"
        await wait_until(loop_ended.is_set, "hook 2 Consumer._drain_messages", "the fetch loop outlived the app")
    finally:
        if not stopped:
            await asyncio.wait_for(app.stop(), 30)
