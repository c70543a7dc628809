"""Kafka helpers shared by the services: producer and consumer factories, topics, headers."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from shared.settings import Settings
from shared.topics import Topics

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
COMPRESSION = "lz4"


def back_off_failed_metadata_updates() -> None:
    """Make aiokafka wait ``retry_backoff_ms`` after a metadata update that reached no broker.

    aiokafka 0.14 runs the next update as soon as its producer's sender or its consumer's fetcher
    asks, and they ask again as soon as an update fails: with the broker down, ingest, router and
    writer each tried about 1,100 connections a second (11,000 "Unable connect" lines per 10 s each,
    before the repeat filter), CPU taken from the acks and from the broker's own restart. Called by
    the factories below; installing it twice is harmless."""
    original = AIOKafkaClient._metadata_update
    if getattr(original, "backs_off", False):
        return

    async def metadata_update(client: AIOKafkaClient, cluster_metadata: Any, topics: Any) -> bool:
        updated: bool = await original(client, cluster_metadata, topics)
        if not updated:
            await asyncio.sleep(client._retry_backoff)
        return updated

    metadata_update.backs_off = True  # type: ignore[attr-defined]
    AIOKafkaClient._metadata_update = metadata_update


def make_producer(
    settings: Settings, *, client_id: str, linger_ms: int = 5, max_batch_bytes: int = 16 * 1024
) -> AIOKafkaProducer:
    """Idempotent, ``acks=all``, compressed: what every BlameTrail producer uses. ``max_batch_bytes``
    bounds one partition's record batch (the consumers': :func:`make_consumer_producer`; ingest keeps
    aiokafka's 16 KB: its batches are a linger's worth, ``ingest.kafka.ingest_producer``).

    lz4 (aiokafka's ``lz4`` extra, cramjam): gzip cost ingest ~3 % of its CPU at saturation
    (``gzip_encode`` in py-spy). Over the Sentry corpus as one batch, lz4 leaves 27 % of the bytes
    (gzip 17 %) for about a thirtieth of gzip's CPU."""
    back_off_failed_metadata_updates()
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        compression_type=COMPRESSION,
        linger_ms=linger_ms,
        max_request_size=settings.kafka_max_message_bytes,
        max_batch_size=max_batch_bytes,
        request_timeout_ms=10_000,
        partitioner=partitioner,
    )


def make_consumer_producer(settings: Settings, *, client_id: str) -> AIOKafkaProducer:
    """The producer of the router's outputs and the consumers' dead letters: record batches of up to
    ``consumer_produce_batch_bytes``, so a consumer batch's records for one partition go in one."""
    return make_producer(settings, client_id=client_id, max_batch_bytes=settings.consumer_produce_batch_bytes)


def make_consumer(
    settings: Settings, *, group_id: str | None, client_id: str, topics: Sequence[str] = ()
) -> AIOKafkaConsumer:
    """Manual commits only. No automatic offset reset: :class:`shared.consumer.ConsumerRuntime` starts a
    new group at the earliest offset and fails loudly on an out-of-range one."""
    back_off_failed_metadata_updates()
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="none",
        max_partition_fetch_bytes=settings.kafka_max_message_bytes,
        fetch_max_bytes=max(52428800, settings.kafka_max_message_bytes),
        isolation_level="read_committed",
        fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
        fetch_min_bytes=settings.consumer_fetch_min_bytes,
    )


def header_map(headers: Iterable[tuple[str, bytes | None]]) -> dict[str, str]:
    """Kafka record headers as text (last value wins; undecodable bytes are replaced)."""
    return {k: (v or b"").decode("utf-8", "replace") for k, v in headers}


def header_value(headers: Iterable[tuple[str, bytes | None]], name: str) -> str | None:
    """One header of ``header_map(headers)`` without decoding the others (the writer reads one per
    record: building the whole map was 5 % of its CPU)."""
    found: bytes | None = None
    seen = False
    for key, value in headers:
        if key == name:
            found, seen = value, True
    return (found or b"").decode("utf-8", "replace") if seen else None


async def create_topics(settings: Settings, partitions: int | None = None) -> list[str]:
    """Create the four topics if missing; returns the names created now."""
    topics = Topics.from_settings(settings)
    count = partitions or settings.topic_partitions
    config = {"max.message.bytes": str(settings.kafka_max_message_bytes)}
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="blametrail-admin")
    await admin.start()
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics.all() if t not in existing]
        for name in missing:
            try:
                await admin.create_topics(
                    [NewTopic(name, count, settings.topic_replication_factor, topic_configs=config)]
                )
                created.append(name)
            except TopicAlreadyExistsError:
                log.info("topic %s already exists", name)
    finally:
        await admin.close()
    return created


def dead_letter_headers(
    headers: Iterable[tuple[str, bytes | None]], *, error: str, stage: str, topic: str, partition: int, offset: int
) -> Headers:
    """The original headers plus where and why a record was dead-lettered (DESIGN.md, dlq topic)."""
    out: Headers = [(k, v or b"") for k, v in headers]
    out += [
        ("error", error[:1000].encode()),
        ("stage", stage.encode()),
        ("original_topic", topic.encode()),
        ("original_partition", str(partition).encode()),
        ("original_offset", str(offset).encode()),
    ]
    return out


@functools.lru_cache(maxsize=1 << 16)
def key_hash(key: bytes) -> int:
    """murmur2 of ``key`` as the Java client uses it (positive), remembered for the 65,536 latest keys.

    aiokafka's murmur2 is pure Python, ~4 µs for a record key (1.5 % of ingest's CPU at saturation,
    3 % of the router's): a key is an issue's, and an issue's events come again and again."""
    value: int = murmur2(key) & 0x7FFFFFFF
    return value


def partition_for(key: bytes, partitions: Sequence[int]) -> int:
    """The partition aiokafka's default partitioner (murmur2, as the Java client) picks for ``key``."""
    return partitions[key_hash(key) % len(partitions)]


def partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    """aiokafka's ``DefaultPartitioner`` with :func:`key_hash`: same partitions, cheaper per record."""
    if key is None:
        return random.choice(available or all_partitions)
    return partition_for(key, all_partitions)
