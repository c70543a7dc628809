"""Consumers against the real broker: an idle topic must not hold back a busy one.

aiokafka sends one fetch at a time per broker, and leaves out the partitions whose fetched records
are still waiting to be processed. While the writer works through a batch of routed records, its
next fetch asks only for the idle ignored topic, and the broker holds it until
``fetch_max_wait_ms``: every routed record produced meanwhile waits for it. With Kafka's 500 ms
the writer fell 0.5 s behind at 1,000 webhooks a second (docs/benchmarks.md); the consumers now ask
for ``consumer_fetch_max_wait_ms``. The records here are far smaller than ``consumer_fetch_min_bytes``:
each one also shows that a lone record is not held past that wait.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import TopicPartition

from shared.kafka import create_topics, make_consumer, make_producer
from shared.settings import Settings
from shared.topics import Topics

pytestmark = pytest.mark.integration

# Longer than aiokafka's prefetch backoff (0.1 s): the batch is slow enough for the fetch that
# leaves its partition out to be sent, as a writer's transaction under load is.
PROCESSING_SECONDS = 0.7
# Kafka's default hold (500 ms) makes the first record below wait about 400 ms; 100 ms at most 100 ms.
BOUND_SECONDS = 0.25


async def test_records_of_a_busy_topic_are_not_held_back_by_an_idle_one(topics: Settings) -> None:
    settings = topics.model_copy(update={"topic_prefix": f"fetch-{uuid.uuid4().hex[:8]}."})
    await create_topics(settings, 1)
    names = Topics.from_settings(settings)
    busy, idle = TopicPartition(names.routed, 0), TopicPartition(names.ignored, 0)
    producer = make_producer(settings, client_id="fetch-test")
    consumer = make_consumer(settings, group_id=None, client_id="fetch-test")
    await producer.start()
    try:
        consumer.assign([busy, idle])
        await consumer.start()
        await consumer.seek_to_beginning(busy, idle)

        async def poll_until(value: bytes) -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=50)
                if any(r.value == value for records in batch.values() for r in records):
                    return
            raise AssertionError(f"{value!r} never arrived")

        await producer.send_and_wait(busy.topic, b"first", partition=0)
        await poll_until(b"first")
        # "Processing" the first batch: a record arrives meanwhile and is fetched into aiokafka's
        # buffer, so the next fetch leaves the busy partition out and asks for the idle one only.
        await producer.send_and_wait(busy.topic, b"during", partition=0)
        await asyncio.sleep(PROCESSING_SECONDS)
        await poll_until(b"during")

        waits: list[float] = []
        for n in range(5):
            value = f"after-{n}".encode()
            await producer.send_and_wait(busy.topic, value, partition=0)
            sent = time.monotonic()
            await poll_until(value)
            waits.append(time.monotonic() - sent)
            await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
        await producer.stop()
    assert max(waits) < BOUND_SECONDS, f"records of the busy topic waited {[round(w, 3) for w in waits]} s"
