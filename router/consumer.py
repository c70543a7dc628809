"""The router: sentry.webhooks.raw → sentry.events.routed | sentry.events.ignored | sentry.webhooks.dlq.

Per record: decode → classify (``shared.sentry``) → resolve (``router.routing`` over the mapping
cache) → produce; per batch, the runtime (``shared.consumer``) commits offset + 1 once every output
was acknowledged. A crash replays the batch and the writer's idempotency absorbs the duplicates.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import Counter

from router.boundary import TimeWindow, sanitize
from router.cache import IssueProjects, MappingCache
from router.routing import OrgMappings, route
from shared import events, metrics
from shared.consumer import Batch, ConsumerConfig, ConsumerRuntime, DeadLetter, Retry, Step
from shared.db.conninfo import libpq_url
from shared.db.session import create_engine, sessionmaker
from shared.kafka import Headers, header_map, make_consumer, make_consumer_producer, partition_for
from shared.logs import EventLog
from shared.producer import Producer, RecordBatch, RenewableProducer, acknowledged, track
from shared.sentry import ParsedWebhook, parse_webhook
from shared.settings import Settings
from shared.topics import Topics

log = logging.getLogger("blametrail.router")


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers


class Undecodable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)


def _received_at(text: str | None, fallback_ms: int) -> datetime:
    if text:
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            pass
    return datetime.fromtimestamp(fallback_ms / 1000, tz=events.utc_now().tzinfo)


@dataclass(frozen=True)
class Delivery:
    """One raw record, read: who sent it, what it says, and where it came from."""

    org: str
    parsed: ParsedWebhook
    delivery_id: str
    received_at: datetime
    raw: events.RawRef
    key: bytes | None
    replay_id: str | None = None  # the replay that republished the raw record
    flags: tuple[str, ...] = ()  # what the boundary check changed (router/boundary.py)

    @property
    def issue_only(self) -> bool:
        """Names a Sentry issue but no project (seer): the issue → project index may know it."""
        return self.parsed.known_resource and not self.parsed.projects and self.parsed.sentry_issue_id is not None


def decode_record(record: ConsumerRecord) -> Delivery:
    """Read one raw record; raises :class:`Undecodable` when it cannot be read at all.

    ``delivery_id`` and ``received_at`` come from ingest's headers; the fallbacks (recomputing the
    id, the record's timestamp) are for records of older producers that did not set them.
    """
    headers = header_map(record.headers)
    org = headers.get(events.H_ORG)
    if not org:
        raise Undecodable("missing org header")
    resource = headers.get(events.H_RESOURCE) or "unknown"
    body: bytes = record.value or b""
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Undecodable(f"body is not JSON: {exc}") from exc
    return Delivery(
        org=org,
        parsed=parse_webhook(resource, decoded),
        delivery_id=headers.get(events.H_DELIVERY_ID) or events.delivery_id(org, resource, body),
        received_at=_received_at(headers.get(events.H_RECEIVED_AT), record.timestamp),
        raw=events.RawRef(topic=record.topic, partition=record.partition, offset=record.offset),
        key=record.key,
        replay_id=headers.get(events.H_REPLAY_ID) or None,
    )


async def with_issue_project(delivery: Delivery, issues: IssueProjects) -> Delivery:
    """An issue-only delivery (seer) with the project the issue → project index knows, if any."""
    if not delivery.issue_only or delivery.parsed.sentry_issue_id is None:
        return delivery
    project = await issues.lookup(delivery.org, delivery.parsed.sentry_issue_id)
    if project is None:
        return delivery
    return replace(delivery, parsed=delivery.parsed.model_copy(update={"projects": (project,)}))


class RouteMetrics:
    """The router's per-event counters, their labelled children kept (``labels()`` is a locked
    lookup per call; an event would pay two)."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], Counter] = {}
        self._mappings: dict[tuple[str, str, str], Counter] = {}
        self._flags: dict[str, Counter] = {}

    def flagged(self, flag: str) -> None:
        child = self._flags.get(flag)
        if child is None:
            child = self._flags[flag] = metrics.ROUTER_FLAGGED.labels(flag=flag)
        child.inc()

    def count(self, outcome: str, reason: str, org: str, mapped: str | None) -> None:
        child = self._events.get((outcome, reason))
        if child is None:
            child = self._events[(outcome, reason)] = metrics.ROUTER_EVENTS.labels(outcome=outcome, reason=reason)
        child.inc()
        if mapped is not None:
            key = (org, mapped, outcome)
            mchild = self._mappings.get(key)
            if mchild is None:
                if len(self._mappings) > 100_000:
                    self._mappings.clear()
                mchild = self._mappings[key] = metrics.ROUTER_MAPPING_EVENTS.labels(
                    org=org, project=mapped, outcome=outcome
                )
            mchild.inc()


def route_delivery(
    delivery: Delivery,
    org_mappings: OrgMappings | None,
    topics: Topics,
    counts: RouteMetrics | None = None,
    lines: EventLog | None = None,
) -> list[Output]:
    """The routed/ignored outputs of one delivery under the org's mappings (None: unknown org),
    counted in ``counts`` and logged (one decision line per output) to ``lines``.

    Events are serialised without building the models (``events.encode_event``): every field comes
    from the parsed, sanitised webhook or from the mapping cache, already typed; validating them again
    per event was a pydantic round trip the router paid for nothing.
    """
    out_headers: Headers = [
        (events.H_ORG, delivery.org.encode()),
        (events.H_DELIVERY_ID, delivery.delivery_id.encode()),
    ]
    if delivery.replay_id:
        out_headers.append((events.H_REPLAY_ID, delivery.replay_id.encode()))
    outputs = []
    for decision in route(delivery.parsed, org_mappings):
        project = decision.project
        fields: dict[str, Any] = events.event_fields(
            delivery.parsed,
            delivery=delivery.delivery_id,
            org=delivery.org,
            project_slug=project.slug if project else None,
            project_id=project.id if project else None,
            received_at=delivery.received_at,
            raw=delivery.raw,
        )
        fields["renamed_from"] = decision.renamed_from
        fields["replay_id"] = delivery.replay_id
        fields["flags"] = delivery.flags
        if decision.renamed_from is not None:
            metrics.ROUTER_RENAMED_PROJECTS.inc()
        mapping = decision.mapping
        model: type[events.OutputEvent]
        if decision.routed and mapping is not None:
            model, topic, reason = events.RoutedEvent, topics.routed, ""
            fields.update(service_id=mapping.service_id, mapping_id=mapping.id)
        else:
            assert decision.reason is not None
            model, topic, reason = events.IgnoredEvent, topics.ignored, decision.reason.value
            fields.update(
                reason=decision.reason,
                service_id=mapping.service_id if mapping else None,
                mapping_id=mapping.id if mapping else None,
            )
        outcome = "routed" if model is events.RoutedEvent else "ignored"
        if counts is not None:
            mapped = (mapping.slug or fields["project_slug"] or "") if mapping is not None else None
            counts.count(outcome, reason, delivery.org, mapped)
        if lines is not None:
            lines.add(
                outcome, delivery_id=delivery.delivery_id, org=delivery.org, resource=delivery.parsed.resource,
                action=delivery.parsed.action, project=fields["project_slug"], reason=reason or None,
                service_id=fields["service_id"], replay_id=delivery.replay_id, flags=list(delivery.flags) or None,
            )  # fmt: skip
        outputs.append(Output(topic, delivery.key, events.encode_event(model, fields), out_headers))
    return outputs


async def produce(producer: Producer, outputs: list[Output]) -> None:
    """Send ``outputs`` and wait until Kafka acknowledged every one; raises the first failure.

    Keyed outputs go in batches per partition (aiokafka's ``create_batch``/``send_batch``: one future
    a batch instead of one a record, a sixth of the router's CPU in its profile), in order within
    each partition, to the partition the default partitioner picks for the key — where ``send``
    would have put them. An output without a key (a record of an old producer) is sent alone.
    """
    partitions: dict[str, list[int]] = {}
    open_batches: dict[tuple[str, int], RecordBatch] = {}
    futures: list[asyncio.Future[object]] = []

    async def submit(topic: str, partition: int) -> None:
        builder = open_batches.pop((topic, partition))
        builder.close()
        track(futures, await producer.send_batch(builder, topic, partition=partition))

    for out in outputs:
        if out.key is None:
            track(futures, await producer.send(out.topic, value=out.value, headers=out.headers))
            continue
        topic_partitions = partitions.get(out.topic)
        if topic_partitions is None:
            topic_partitions = partitions[out.topic] = sorted(await producer.partitions_for(out.topic))
        target = (out.topic, partition_for(out.key, topic_partitions))
        builder = open_batches.get(target)
        if builder is None:
            builder = open_batches[target] = producer.create_batch()
        if builder.append(timestamp=None, key=out.key, value=out.value, headers=out.headers) is None:
            await submit(*target)  # full: send it, start the partition's next one
            builder = open_batches[target] = producer.create_batch()
            if builder.append(timestamp=None, key=out.key, value=out.value, headers=out.headers) is None:
                open_batches.pop(target)  # larger than a batch: on its own
                track(futures, await producer.send(out.topic, value=out.value, key=out.key, headers=out.headers))
    for target in list(open_batches):
        await submit(*target)
    await acknowledged(producer, futures)


class RouterStep(Step):
    """Routes each raw record, produces its outputs and waits for every acknowledgement.

    Only a record that cannot be read at all (:class:`Undecodable`) is dead-lettered; any other
    exception is a bug and stops the router (see :mod:`shared.consumer`).
    """

    name = "router"

    def __init__(
        self,
        cache: MappingCache,
        issues: IssueProjects,
        topics: Topics,
        producers: RenewableProducer,
        window: TimeWindow,
    ) -> None:
        self.cache = cache
        self.issues = issues
        self.topics = topics
        self.producers = producers
        self.window = window
        self.counts = RouteMetrics()
        self.lines = EventLog(log)

    async def process(self, batch: Batch) -> list[DeadLetter]:
        outputs, dead = await self.outputs_of(batch)
        try:
            await produce(self.producers.current, outputs)
        except KafkaError as exc:
            # The broker (or a partition leader) is away: the same batch again after a backoff, its
            # outputs sent again (the writer's idempotency absorbs what was already delivered).
            raise Retry("kafka", f"producing the batch's outputs failed: {exc!r}") from exc
        self.lines.flush()
        metrics.MAPPING_CACHE_AGE.set(self.cache.age_seconds)
        return dead

    async def outputs_of(self, batch: Batch) -> tuple[list[Output], list[DeadLetter]]:
        """The batch's outputs, in record order, and its records that cannot be read at all;
        counted, their log lines kept for :meth:`process` to write once they are produced."""
        outputs: list[Output] = []
        dead = []
        for record in batch:
            try:
                delivery = decode_record(record)
            except Undecodable as exc:
                org = header_map(record.headers).get(events.H_ORG) or None
                dead.append(DeadLetter(record, str(exc), "router.decode", org))
                continue
            parsed, flags = sanitize(delivery.parsed, delivery.received_at, self.window)
            if flags:
                delivery = replace(delivery, parsed=parsed, flags=flags)
                for flag in flags:
                    self.counts.flagged(flag)
            if delivery.replay_id:
                metrics.REPLAYED_RECORDS.labels(topic="raw").inc()
            org_mappings = self.cache.lookup(delivery.org)
            if org_mappings is None:
                org_mappings = await self.cache.lookup_new(delivery.org)
            if org_mappings is not None:
                delivery = await with_issue_project(delivery, self.issues)
            outputs.extend(route_delivery(delivery, org_mappings, self.topics, self.counts, self.lines))
        return outputs, dead


class Router:
    """The router service: the mapping cache, and the consumer runtime over :class:`RouterStep`."""

    def __init__(self, settings: Settings) -> None:
        self.topics = Topics.from_settings(settings)
        self._engine = create_engine(settings, pool_size=2)
        sessions = sessionmaker(self._engine)
        self.cache = MappingCache(sessions, libpq_url(settings), settings.mapping_refresh_seconds)
        producers = RenewableProducer(
            lambda: make_consumer_producer(settings, client_id="blametrail-router"),
            settings.router_group,
        )
        config = ConsumerConfig.of(
            settings,
            group=settings.router_group,
            topics=(self.topics.raw,),
            dlq_max_ratio=settings.router_dlq_max_ratio,
            dlq_window=settings.router_dlq_window,
        )
        consumer = make_consumer(settings, group_id=config.group, client_id="blametrail-router")
        window = TimeWindow.of(settings.event_time_before_days, settings.event_time_after_hours)
        step = RouterStep(self.cache, IssueProjects(sessions), self.topics, producers, window)
        self.runtime = ConsumerRuntime(config, step, consumer, producers)

    @property
    def consumer(self) -> AIOKafkaConsumer:
        return self.runtime.consumer

    async def run(self, stop: asyncio.Event) -> None:
        await self.cache.start()
        try:
            await self.runtime.run(stop)
        finally:
            await self.cache.stop()
            await self._engine.dispose()
