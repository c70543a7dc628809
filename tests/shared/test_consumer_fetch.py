"""Consumers against the real broker: how long a fetch may keep records waiting.

aiokafka sends one fetch at a time per broker, and leaves out the partitions whose fetched records
are still waiting to be processed. While the writer works through a batch of routed records, its
next fetch asks only for the idle ignored topic, and the broker holds it until
``consumer_fetch_max_wait_ms``: every routed record produced meanwhile waits for it (Kafka's 500 ms
put the writer 0.5 s behind at 1,000 webhooks a second; docs/benchmarks.md, fifth session).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from shared.kafka import create_topics, make_consumer, make_producer
from shared.settings import Settings
from shared.topics import Topics

pytestmark = pytest.mark.integration

# Longer than aiokafka's prefetch backoff (0.1 s): the batch is slow enough for the fetch that
# leaves its partition out to be sent, as a writer's transaction under load is.
PROCESSING_SECONDS = 0.7
# With the default hold (100 ms) a record below waits at most about 100 ms; with Kafka's 500 ms the
# first one waits about 400 ms.
HOLD_BOUND_SECONDS = 0.25


async def _started(settings: Settings, *partitions: TopicPartition) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
    producer = make_producer(settings, client_id="fetch-test")
    consumer = make_consumer(settings, group_id=None, client_id="fetch-test")
    await producer.start()
    consumer.assign(list(partitions))
    await consumer.start()
    await consumer.seek_to_beginning(*partitions)
    return producer, consumer


async def _topics(base: Settings, **update: object) -> tuple[Settings, Topics]:
    settings = base.model_copy(update={"topic_prefix": f"fetch-{uuid.uuid4().hex[:8]}.", **update})
    await create_topics(settings, 1)
    return settings, Topics.from_settings(settings)


async def _arrival(consumer: AIOKafkaConsumer, value: bytes, within: float = 30.0) -> float:
    """When ``value`` came out of ``consumer.getmany`` (monotonic)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        batch = await consumer.getmany(timeout_ms=50)
        if any(r.value == value for records in batch.values() for r in records):
            return time.monotonic()
    raise AssertionError(f"{value!r} never arrived")


async def test_records_of_a_busy_topic_are_not_held_back_by_an_idle_one(settings: Settings) -> None:
    # No minimum: only the hold decides how long a fetch waits (the minimum is the next test's).
    settings, names = await _topics(settings, consumer_fetch_min_bytes=1)
    busy, idle = TopicPartition(names.routed, 0), TopicPartition(names.ignored, 0)
    producer, consumer = await _started(settings, busy, idle)
    try:
        await producer.send_and_wait(busy.topic, b"first", partition=0)
        await _arrival(consumer, b"first")
        # "Processing" the first batch: a record arrives meanwhile and is fetched into aiokafka's
        # buffer, so the next fetch leaves the busy partition out and asks for the idle one only.
        await producer.send_and_wait(busy.topic, b"during", partition=0)
        await asyncio.sleep(PROCESSING_SECONDS)
        await _arrival(consumer, b"during")

        waits: list[float] = []
        for n in range(5):
            value = f"after-{n}".encode()
            sent = time.monotonic()
            await producer.send_and_wait(busy.topic, value, partition=0)
            waits.append(await _arrival(consumer, value) - sent)
            await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
        await producer.stop()
    assert max(waits) < HOLD_BOUND_SECONDS, f"records of the busy topic waited {[round(w, 3) for w in waits]} s"


async def test_a_lone_record_smaller_than_the_fetch_minimum_waits_only_the_hold(settings: Settings) -> None:
    settings, names = await _topics(settings)
    assert settings.consumer_fetch_min_bytes > 1000  # the record below is far smaller
    hold = settings.consumer_fetch_max_wait_ms / 1000
    quiet = TopicPartition(names.routed, 0)
    producer, consumer = await _started(settings, quiet)
    waits: list[float] = []
    try:
        # A record sent at a random moment meets a fetch the broker has already held for part of
        # the hold (CI saw one wait 12 ms). Once one has come out, the consumer's next fetch starts
        # at once, so each record sent right after an arrival meets a fetch held from its start.
        await producer.send_and_wait(quiet.topic, b"primer", partition=0)
        await _arrival(consumer, b"primer")
        for n in range(3):
            value = f"lone-{n}".encode()
            sent = time.monotonic()
            await producer.send_and_wait(quiet.topic, value, partition=0)
            waits.append(await _arrival(consumer, value) - sent)
    finally:
        await consumer.stop()
        await producer.stop()
    shown = f"lone records waited {[round(w, 3) for w in waits]} s (hold {hold} s)"
    assert min(waits) > hold / 2, f"the fetch minimum is not in effect: {shown}"  # the broker held them
    assert max(waits) < hold + 0.15, shown
