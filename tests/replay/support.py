"""Helpers of the replay tests (``tests/replay/``); this module holds no tests.

Each test gets topics and consumer groups of its own; records are produced with explicit
timestamps, the way ingest (raw) and the router (routed/ignored) write them.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from replay.progress import PlainProgress, Progress
from replay.run import Options, Summary, run_replay
from replay.selection import Filters
from replay.window import epoch_ms, group_less_consumer, partitions_of
from shared import events
from shared.kafka import Headers, create_topics
from shared.mappings import create_service
from shared.orgs import create_org
from shared.sentry import raw_record_key
from shared.settings import Settings
from shared.topics import Topics
from tests.support import blametrail_command, settings_env
from tests.support.kafka import Record, TopicReader

# Record timestamps of the tests: a few hours ago, well inside retention and the broker's time limits.
BASE = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=3)


def at(minute: float) -> datetime:
    return BASE + timedelta(minutes=minute)


async def own_settings(base: Settings, name: str) -> Settings:
    """``base`` with topics (created) and router/writer groups of its own."""
    prefix = f"rp-{name}-{uuid.uuid4().hex[:6]}."
    settings = base.model_copy(
        update={"topic_prefix": prefix, "router_group": prefix + "router", "writer_group": prefix + "writer"}
    )
    await create_topics(settings)
    return settings


async def org_with_services(sessions: async_sessionmaker[AsyncSession], *names: str) -> tuple[str, int, dict[str, int]]:
    """A new org with services ``names``: its slug, its id and each service's id by name."""
    slug = f"rp-{uuid.uuid4().hex[:8]}"
    async with sessions() as session, session.begin():
        org = await create_org(session, slug)
        services = {n: (await create_service(session, org.org_id, n)).id for n in names}
    return slug, org.org_id, services


@dataclass(frozen=True)
class Out:
    """A record to produce."""

    topic: str
    value: bytes
    key: bytes | None
    headers: Headers = field(default_factory=list)
    minute: float = 0  # its timestamp: at(minute)
    partition: int | None = None  # None: by key


def raw(topics: Topics, org: str, body: bytes, minute: float, resource: str = "issue") -> Out:
    """A raw record as ingest writes it (plus a request id, one more header to keep)."""
    headers = [
        (events.H_ORG, org.encode()),
        (events.H_RESOURCE, resource.encode()),
        (events.H_DELIVERY_ID, events.delivery_id(org, resource, body).encode()),
        (events.H_RECEIVED_AT, events.rfc3339(at(minute)).encode()),
        (events.H_REQUEST_ID, uuid.uuid4().hex.encode()),
    ]
    return Out(topics.raw, body, raw_record_key(org, resource, body).encode(), headers, minute)


def event(topics: Topics, ev: events.OutputEvent, minute: float) -> Out:
    """A routed or ignored event as the router writes it."""
    topic = topics.routed if ev.outcome == "routed" else topics.ignored
    headers = [(events.H_ORG, ev.org.encode()), (events.H_DELIVERY_ID, ev.delivery_id.encode())]
    return Out(topic, ev.model_dump_json().encode(), f"{ev.org}:{ev.project_slug}".encode(), headers, minute)


async def produce(settings: Settings, records: Iterable[Out]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    await producer.start()
    try:
        sent = []
        for r in records:
            stamp = epoch_ms(at(r.minute))
            sent.append(
                await producer.send(
                    r.topic, r.value, r.key, headers=r.headers, partition=r.partition, timestamp_ms=stamp
                )
            )
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def quiet(replay_id: str, estimate: int) -> Progress:
    return PlainProgress(replay_id, estimate, io.StringIO())


async def replay(
    settings: Settings,
    topic: str,
    start: float,
    end: float,
    *,
    stop: asyncio.Event | None = None,
    progress: Callable[[str, int], Progress] = quiet,
    **options: Any,
) -> Summary:
    """``run_replay`` in this process over minutes ``start`` … ``end`` of :data:`BASE`."""
    filters = Filters(**{k: options.pop(k) for k in ("org", "project", "reason") if k in options})
    opts = Options(topic, at(start), at(end), filters, **options)
    return await run_replay(settings, opts, stop or asyncio.Event(), progress=progress)


async def end_total(settings: Settings, topics: Iterable[str]) -> int:
    """How many records ``topics`` hold (the sum of their partitions' end offsets)."""
    consumer = group_less_consumer(settings)
    await consumer.start()
    try:
        partitions = await partitions_of(consumer, topics)
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


async def read(settings: Settings, topics: Iterable[str], replay_id: str) -> list[Record]:
    """Every record of ``topics`` (read to their current end) that carries ``replay_id``."""
    topics = list(topics)
    total = await end_total(settings, topics)
    async with TopicReader(settings.kafka_bootstrap, topics) as reader:
        await reader.wait_for_count(total)
    return [r for r in reader.records if r.headers.get(events.H_REPLAY_ID) == replay_id]


def cli(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``blametrail <args>`` as a separate process with ``settings``."""
    return subprocess.run(
        [*blametrail_command(), *args], env=settings_env(settings), capture_output=True, text=True, timeout=timeout
    )
