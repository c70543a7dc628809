"""Helpers of the incident writer tests (``tests/incident_writer/``); this module holds no tests.

Events are built as the router builds them and produced straight to the routed/ignored topics, so
the writer is tested on its own against the real broker and database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import random
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from incident_writer.consumer import IncidentWriter
from incident_writer.incidents import IncidentAction, incident_action
from shared.db.models import AuditRecord, Incident, IncidentEvent
from shared.events import IgnoredEvent, OutputEvent, RawRef, Reason, RoutedEvent
from shared.kafka import create_topics, make_producer
from shared.mappings import add_mapping, create_service
from shared.orgs import create_org
from shared.sentry import record_key
from shared.settings import Settings
from shared.topics import Topics
from tests.support import wait_until
from tests.support.kafka import TopicReader

_offsets = itertools.count()
BASE_TIME = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Org:
    """A test organisation with services; ``mappings[i]`` maps project ``projects[i]`` to ``services[i]``."""

    slug: str
    org_id: int
    services: tuple[int, ...]
    mappings: tuple[int, ...]
    projects: tuple[str, ...]


async def make_org(sessions: async_sessionmaker[AsyncSession], services: int = 2) -> Org:
    """A new organisation with ``services`` services, each mapped from project ``proj-<i>``."""
    slug = f"wr-{uuid.uuid4().hex[:10]}"
    async with sessions() as session, session.begin():
        org = await create_org(session, slug)
        service_ids, mapping_ids, projects = [], [], []
        for i in range(services):
            service = await create_service(session, org.org_id, f"Service {i}")
            mapping = await add_mapping(session, org.org_id, f"proj-{i}", service.id)
            service_ids.append(service.id)
            mapping_ids.append(mapping.id)
            projects.append(f"proj-{i}")
    return Org(slug, org.org_id, tuple(service_ids), tuple(mapping_ids), tuple(projects))


def delivery(*parts: object) -> str:
    """A delivery id (hex SHA-256, like ingest's) derived from ``parts``."""
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()


def routed(
    org: Org,
    *,
    resource: str = "issue",
    action: str = "created",
    issue: str | None = "1",
    key: str | None = None,
    service: int = 0,
    project: str | None = None,
    delivery_id: str | None = None,
    minute: int = 0,
    level: str | None = "error",
    title: str | None = None,
) -> RoutedEvent:
    """A routed event of ``org`` for service ``org.services[service]``; ``key`` overrides ``issue:<issue>``."""
    incident_key = key or (f"issue:{issue}" if issue else None)
    return RoutedEvent(
        delivery_id=delivery_id or uuid.uuid4().hex + uuid.uuid4().hex,
        org=org.slug,
        resource=resource,
        action=action,
        project_slug=project or org.projects[service],
        sentry_issue_id=issue,
        incident_key=incident_key,
        title=title if title is not None else f"{resource} {issue or key}",
        level=level,
        culprit="app.views in index",
        web_url=f"https://sentry.io/organizations/{org.slug}/issues/{issue}/",
        occurred_at=BASE_TIME + timedelta(minutes=minute),
        received_at=BASE_TIME + timedelta(minutes=minute, seconds=1),
        raw=RawRef(topic="sentry.webhooks.raw", partition=0, offset=next(_offsets)),
        service_id=org.services[service],
        mapping_id=org.mappings[service],
    )


def ignored(org: Org, *, project: str | None = "unmapped-project", reason: Reason = Reason.UNMAPPED) -> IgnoredEvent:
    return IgnoredEvent(
        delivery_id=uuid.uuid4().hex + uuid.uuid4().hex,
        org=org.slug,
        resource="issue",
        action="created",
        project_slug=project,
        sentry_issue_id="77",
        incident_key="issue:77",
        title="ignored event",
        received_at=BASE_TIME,
        raw=RawRef(topic="sentry.webhooks.raw", partition=0, offset=next(_offsets)),
        reason=reason,
    )


async def isolated_settings(base: Settings, name: str) -> Settings:
    """``base`` with topics and a writer group of its own (created), so tests do not share streams."""
    prefix = f"{base.topic_prefix}{name}-{uuid.uuid4().hex[:6]}."
    settings = base.model_copy(
        update={
            "topic_prefix": prefix,
            "writer_group": prefix + "writer",
            "writer_metrics_port": 0,
            "consumer_batch_timeout_ms": 50,
        }
    )
    await create_topics(settings)
    return settings


def partition_key(event: OutputEvent) -> bytes:
    """The key the router gives ``event``'s record (the raw record's key)."""
    return record_key(event.org, event.sentry_issue_id, event.project_slug).encode()


async def produce(
    settings: Settings,
    events: Iterable[OutputEvent],
    *,
    partition: int | None = None,
    spread_over: int | None = None,
    linger_ms: int = 20,
) -> int:
    """Produce ``events`` to the routed/ignored topic by outcome; waits for every acknowledgement.

    By the router's key, or all to ``partition``, or round-robin over ``spread_over`` partitions (so
    events of one incident reach several writers at once)."""
    topics = Topics.from_settings(settings)
    producer: AIOKafkaProducer = make_producer(settings, client_id="writer-tests", linger_ms=linger_ms)
    await producer.start()
    try:
        futures = []
        for i, event in enumerate(events):
            topic = topics.routed if isinstance(event, RoutedEvent) else topics.ignored
            target = i % spread_over if spread_over else partition
            value = event.model_dump_json().encode()
            futures.append(await producer.send(topic, value=value, key=partition_key(event), partition=target))
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


async def produce_raw(settings: Settings, topic: str, values: Sequence[bytes], key: bytes = b"k") -> None:
    producer: AIOKafkaProducer = make_producer(settings, client_id="writer-tests")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


@asynccontextmanager
async def running_writer(
    settings: Settings, kind: type[IncidentWriter] = IncidentWriter
) -> AsyncIterator[IncidentWriter]:
    """An :class:`IncidentWriter` (or ``kind``) running in this event loop; stopped (and checked) on exit."""
    writer = kind(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop), name="writer")
    try:
        yield writer
        assert not task.done(), f"writer stopped early: {task.exception() if task.done() else None!r}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def dead_letters(settings: Settings, count: int, within: float = 30.0) -> list[tuple[bytes, dict[str, str]]]:
    """The first ``count`` records of the dead-letter topic (fewer if ``within`` passes): (value, headers)."""
    async with TopicReader(settings.kafka_bootstrap, [Topics.from_settings(settings).dlq]) as reader:
        with contextlib.suppress(AssertionError):
            await reader.wait_for_count(count, within=within)
        return [(r.value, r.headers) for r in reader.records[:count]]


async def audit_count(sessions: async_sessionmaker[AsyncSession], org: str) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).where(AuditRecord.org_slug == org)) or 0)


async def audit_records(sessions: async_sessionmaker[AsyncSession], org: str) -> list[AuditRecord]:
    async with sessions() as session:
        rows = await session.scalars(select(AuditRecord).where(AuditRecord.org_slug == org).order_by(AuditRecord.id))
        return list(rows)


async def incidents(sessions: async_sessionmaker[AsyncSession], org_id: int) -> list[Incident]:
    async with sessions() as session:
        rows = await session.scalars(select(Incident).where(Incident.org_id == org_id).order_by(Incident.id))
        return list(rows)


async def timeline(sessions: async_sessionmaker[AsyncSession], incident_id: int) -> list[IncidentEvent]:
    async with sessions() as session:
        rows = await session.scalars(
            select(IncidentEvent).where(IncidentEvent.incident_id == incident_id).order_by(IncidentEvent.id)
        )
        return list(rows)


async def wait_for_audit(
    sessions: async_sessionmaker[AsyncSession], org: str, count: int, within: float = 30.0
) -> list[AuditRecord]:
    """Wait until ``org`` has at least ``count`` audit records; fail past ``within`` seconds."""

    async def enough() -> list[AuditRecord] | None:
        return await audit_records(sessions, org) if await audit_count(sessions, org) >= count else None

    return await wait_until(enough, within=within, what=f"{count} audit records of {org}")


@dataclass(frozen=True)
class Workload:
    """A stream of routed events and what it must leave behind, computed independently of the writer."""

    events: list[RoutedEvent]
    deliveries: int  # distinct (delivery, project): the audit records
    occurrences: dict[tuple[int, str], int]  # (service_id, incident_key) → distinct occurrence deliveries


def workload(org: Org, *, events: int, issues: int, seed: int, duplicates: float = 0.1) -> Workload:
    """``events`` routed events over ``issues`` issues of ``org``'s services: mostly occurrences (issue,
    error, event alert), some comments and assignments; a ``duplicates`` share are copies of earlier ones."""
    rng = random.Random(seed)
    kinds = [("error", "created")] * 6 + [("event_alert", "triggered"), ("issue", "created")]
    kinds += [("comment", "created"), ("issue", "assigned")]
    out: list[RoutedEvent] = []
    for i in range(events):
        if out and rng.random() < duplicates:
            out.append(rng.choice(out))
            continue
        issue = rng.randrange(issues)
        resource, action = rng.choice(kinds)
        out.append(
            routed(
                org,
                resource=resource,
                action=action,
                issue=str(1000 + issue),
                service=issue % len(org.services),
                minute=i % 600,
                level=rng.choice(["info", "warning", "error", "fatal"]),
                delivery_id=delivery(org.slug, seed, i),
            )
        )
    distinct = {e.delivery_id: e for e in out}
    occurrences: dict[tuple[int, str], int] = {}
    for e in distinct.values():
        if incident_action(e.resource, e.action, e.activity_type) is IncidentAction.OCCURRENCE and e.incident_key:
            key = (e.service_id, e.incident_key)
            occurrences[key] = occurrences.get(key, 0) + 1
    return Workload(out, len(distinct), occurrences)


async def committed_total(settings: Settings, group: str) -> int:
    """Sum of the offsets ``group`` committed on the routed and ignored topics (0 while the broker
    cannot tell yet: a fresh broker loads its group coordinator lazily)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="writer-tests")
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    except KafkaError as exc:
        if not exc.retriable:
            raise
        return 0
    finally:
        await admin.close()
    return sum(meta.offset for meta in offsets.values() if meta.offset > 0)


async def assert_exact(sessions: async_sessionmaker[AsyncSession], org: Org, expected: Workload) -> None:
    """One audit record per delivery; one incident per (service, key), counting each occurrence once."""
    assert await audit_count(sessions, org.slug) == expected.deliveries
    found = {(i.service_id, i.incident_key): i for i in await incidents(sessions, org.org_id)}
    assert {key: i.event_count for key, i in found.items()} == expected.occurrences
    async with sessions() as session:
        rows = await session.execute(
            select(IncidentEvent.incident_id, IncidentEvent.change, func.count())
            .join(Incident, Incident.id == IncidentEvent.incident_id)
            .where(Incident.org_id == org.org_id, IncidentEvent.change.in_(["opened", "updated", "reopened"]))
            .group_by(IncidentEvent.incident_id, IncidentEvent.change)
        )
        per_incident: dict[int, dict[str, int]] = {}
        for incident_id, change, n in rows:
            per_incident.setdefault(incident_id, {})[change] = n
    for incident in found.values():
        changes = per_incident.get(incident.id, {})
        assert changes.get("opened") == 1, (incident.incident_key, changes)
        assert sum(changes.values()) == incident.event_count, (incident.incident_key, changes)
    async with sessions() as session:
        linked = await session.scalar(
            select(func.count()).where(AuditRecord.org_slug == org.slug, AuditRecord.incident_id.is_not(None))
        )
    assert linked and linked >= sum(expected.occurrences.values())


async def group_members(settings: Settings, group: str) -> tuple[str, int]:
    """The consumer group's state (``Stable``, ``PreparingRebalance``, …) and its number of members."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="writer-tests")
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
    except KafkaError as exc:
        if not exc.retriable:
            raise
        return "Unknown", 0
    finally:
        await admin.close()
    # DescribeGroupsResponse groups: (error_code, group_id, state, protocol_type, protocol, members, …)
    [described] = response.groups
    return str(described[2]), len(described[5])
