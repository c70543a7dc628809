"""The router: sentry.webhooks.raw → sentry.events.routed | sentry.events.ignored | sentry.webhooks.dlq.

Chain per batch: decode → classify (``shared.sentry``) → resolve (``router.routing`` over the
mapping cache) → produce → wait for every acknowledgement → commit offset + 1. Offsets are
committed only for records whose outputs the broker acknowledged; a crash replays the batch and the
writer's idempotency absorbs the duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from router.cache import MappingCache
from router.routing import route
from shared import events, metrics
from shared.db.session import create_engine, libpq_url, sessionmaker
from shared.kafka import Headers, dead_letter_headers, header_map, make_consumer, make_producer
from shared.runtime import DeadLetterBudget, RebalanceGuard, record_lag
from shared.sentry import parse_webhook
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


def route_record(record: ConsumerRecord, cache: MappingCache, topics: Topics) -> list[Output]:
    """Outputs for one raw record; raises :class:`Undecodable` when it cannot be read at all."""
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
    parsed = parse_webhook(resource, decoded)
    delivery = headers.get(events.H_DELIVERY_ID) or events.delivery_id(org, resource, body)
    raw = events.RawRef(topic=record.topic, partition=record.partition, offset=record.offset)
    received_at = _received_at(headers.get(events.H_RECEIVED_AT), record.timestamp)
    out_headers: Headers = [(events.H_ORG, org.encode()), (events.H_DELIVERY_ID, delivery.encode())]
    outputs = []
    for decision in route(parsed, cache.lookup(org)):
        project = decision.project
        fields = events.event_fields(
            parsed,
            delivery=delivery,
            org=org,
            project_slug=project.slug if project else None,
            project_id=project.id if project else None,
            received_at=received_at,
            raw=raw,
        )
        event: events.OutputEvent
        if decision.routed and decision.mapping is not None:
            event = events.RoutedEvent(**fields, service_id=decision.mapping.service_id, mapping_id=decision.mapping.id)
            topic, reason = topics.routed, ""
        else:
            assert decision.reason is not None
            mapping = decision.mapping
            event = events.IgnoredEvent(
                **fields,
                reason=decision.reason,
                service_id=mapping.service_id if mapping else None,
                mapping_id=mapping.id if mapping else None,
            )
            topic, reason = topics.ignored, decision.reason.value
        metrics.ROUTER_EVENTS.labels(outcome=event.outcome, reason=reason).inc()
        outputs.append(Output(topic, record.key, event.model_dump_json().encode(), out_headers))
    return outputs


def dead_letter(record: ConsumerRecord, error: str, stage: str, topics: Topics) -> Output:
    headers = dead_letter_headers(
        record.headers, error=error, stage=stage, topic=record.topic, partition=record.partition, offset=record.offset
    )
    return Output(topics.dlq, record.key, record.value or b"", headers)


class Router:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.group = settings.router_group
        self._engine = create_engine(settings, pool_size=2)
        self.cache = MappingCache(sessionmaker(self._engine), libpq_url(settings), settings.mapping_refresh_seconds)
        self.consumer: AIOKafkaConsumer = make_consumer(settings, group_id=self.group, client_id="blametrail-router")
        self.producer: AIOKafkaProducer = make_producer(settings, client_id="blametrail-router")
        self.guard = RebalanceGuard(self.group)
        self.dead_letters = DeadLetterBudget(settings.router_dlq_max_ratio, settings.router_dlq_window)

    async def run(self, stop: asyncio.Event) -> None:
        await self.cache.start()
        await self.producer.start()
        self.consumer.subscribe([self.topics.raw], listener=self.guard)
        await self.consumer.start()
        log.info("router consuming %s", self.topics.raw)
        try:
            while not stop.is_set():
                batch = await self.consumer.getmany(
                    timeout_ms=self.settings.consumer_batch_timeout_ms,
                    max_records=self.settings.consumer_batch_max,
                )
                if batch:
                    async with self.guard.batch():
                        await self.handle_batch(batch)
        finally:
            await self.consumer.stop()
            await self.producer.stop()
            await self.cache.stop()
            await self._engine.dispose()

    async def handle_batch(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        sends = []
        offsets: dict[TopicPartition, int] = {}
        count = 0
        now_ms = time.time() * 1000
        for tp, records in batch.items():
            for record in records:
                count += 1
                try:
                    outputs = route_record(record, self.cache, self.topics)
                    self.dead_letters.record(dead=False)
                except Exception as exc:  # one bad record must not stop the partition
                    stage = "router.decode" if isinstance(exc, Undecodable) else "router.route"
                    log.warning("dead-lettering %s[%d]@%d (%s): %r", tp.topic, tp.partition, record.offset, stage, exc)
                    self.dead_letters.record(dead=True)
                    metrics.DLQ_MESSAGES.labels(stage="router").inc()
                    outputs = [dead_letter(record, str(exc), stage, self.topics)]
                for out in outputs:
                    sends.append(await self.producer.send(out.topic, value=out.value, key=out.key, headers=out.headers))
                metrics.CONSUMER_PROCESSING_SECONDS.labels(group=self.group).observe(
                    max(0.0, (now_ms - record.timestamp) / 1000)
                )
            offsets[tp] = records[-1].offset + 1
        # Commit only once the broker acknowledged every output of the batch.
        await asyncio.gather(*sends)
        await self.consumer.commit(offsets)
        metrics.CONSUMER_BATCH_SIZE.labels(group=self.group).observe(count)
        metrics.CONSUMER_COMMITS.labels(group=self.group).inc()
        record_lag(self.consumer, self.group, offsets)
        metrics.MAPPING_CACHE_AGE.set(self.cache.age_seconds)
