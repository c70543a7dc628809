"""The benchmarks wait for router and writer to have no lag before a run, and ``--fresh`` deletes only a
run directory of ``scripts/up.sh``: a backlog or a grown database must not be measured as the run's."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.harness import pipeline_lag, wait_idle
from bench.stack import stack_reset
from shared.kafka import create_topics, make_producer
from shared.settings import Settings
from shared.topics import Topics


async def test_wait_idle_waits_for_every_group_to_commit_its_topics(topics: Settings) -> None:
    prefix = f"idle-{uuid.uuid4().hex[:8]}."
    kafka = topics.model_copy(
        update={"topic_prefix": prefix, "router_group": prefix + "router", "writer_group": prefix + "writer"}
    )
    await create_topics(kafka)
    names = Topics.from_settings(kafka)
    producer = make_producer(kafka, client_id="test-idle")
    await producer.start()
    try:
        sent = [await producer.send_and_wait(names.raw, b"{}", key=b"k") for _ in range(3)]
        routed = await producer.send_and_wait(names.routed, b"{}", key=b"k")
    finally:
        await producer.stop()

    assert await asyncio.to_thread(pipeline_lag, kafka) == {"router": 3, "writer": 1}
    waited = await asyncio.to_thread(wait_idle, kafka, 0.5)
    assert waited["idle"] is False and waited["lag_left"] == {"router": 3, "writer": 1}, waited

    async def commit(group: str, tp: TopicPartition, offset: int) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka.kafka_bootstrap, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.commit({tp: offset})
        finally:
            await consumer.stop()

    await commit(kafka.router_group, TopicPartition(names.raw, sent[-1].partition), sent[-1].offset + 1)
    waited = await asyncio.to_thread(wait_idle, kafka, 0.5)
    assert waited["idle"] is False and waited["lag_left"] == {"router": 0, "writer": 1}, waited
    await commit(kafka.writer_group, TopicPartition(names.routed, routed.partition), routed.offset + 1)
    waited = await asyncio.to_thread(wait_idle, kafka, 30)
    assert waited["idle"] is True and waited["lag_left"] == {"router": 0, "writer": 0}, waited


def test_fresh_deletes_only_a_run_directory(tmp_path: Path) -> None:
    stray = tmp_path / "not-a-stack"
    stray.mkdir()
    (stray / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not a run directory"):
        stack_reset(stray)
    assert (stray / "precious.txt").read_text() == "keep me"
    stack_reset(tmp_path / "absent")  # nothing to delete: no error
