"""The incident writer: sentry.events.routed + sentry.events.ignored → Postgres.

Chain per batch: decode → write the whole batch in one transaction (``store.write_batch``) →
commit the transaction → commit offset + 1. An offset is never committed before its effect is
committed in Postgres; on a database error nothing is committed and the batch is retried with
backoff until it succeeds (redelivery after a crash is absorbed by idempotent writes).
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError

from incident_writer.store import write_batch
from shared import metrics
from shared.db.session import create_engine, sessionmaker
from shared.events import IgnoredEvent, OutputEvent, RoutedEvent
from shared.kafka import dead_letter_headers, make_consumer, make_producer
from shared.runtime import RebalanceMetrics, record_lag
from shared.settings import Settings
from shared.topics import Topics

log = logging.getLogger("blametrail.writer")

EVENT = TypeAdapter[OutputEvent](RoutedEvent | IgnoredEvent)


class IncidentWriter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.group = settings.writer_group
        self._engine = create_engine(settings, pool_size=2)
        self._sessions = sessionmaker(self._engine)
        self.consumer: AIOKafkaConsumer = make_consumer(settings, group_id=self.group, client_id="blametrail-writer")
        self.producer: AIOKafkaProducer = make_producer(settings, client_id="blametrail-writer")

    async def run(self, stop: asyncio.Event) -> None:
        await self.producer.start()
        self.consumer.subscribe([self.topics.routed, self.topics.ignored], listener=RebalanceMetrics(self.group))
        await self.consumer.start()
        log.info("writer consuming %s, %s", self.topics.routed, self.topics.ignored)
        try:
            while not stop.is_set():
                batch = await self.consumer.getmany(
                    timeout_ms=self.settings.consumer_batch_timeout_ms,
                    max_records=self.settings.consumer_batch_max,
                )
                if batch:
                    await self.handle_batch(batch, stop)
        finally:
            await self.consumer.stop()
            await self.producer.stop()
            await self._engine.dispose()

    async def handle_batch(self, batch: dict[TopicPartition, list[ConsumerRecord]], stop: asyncio.Event) -> None:
        decoded: list[OutputEvent] = []
        dead: list[tuple[ConsumerRecord, str]] = []
        offsets: dict[TopicPartition, int] = {}
        for tp, records in batch.items():
            for record in records:
                try:
                    decoded.append(EVENT.validate_json(record.value or b""))
                except ValidationError as exc:
                    dead.append((record, f"invalid event: {exc.errors()[0].get('msg', exc)}"))
            offsets[tp] = records[-1].offset + 1
        for record, error in dead:
            await self._dead_letter(record, error)
        backoff = 0.2
        while True:
            started = time.perf_counter()
            try:
                async with self._sessions() as session, session.begin():
                    result = await write_batch(session, decoded)
                break
            except (OperationalError, DBAPIError) as exc:
                metrics.WRITER_EVENTS.labels(outcome="error").inc(len(decoded))
                if stop.is_set():
                    raise
                log.warning("database write failed (%r); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        metrics.WRITER_BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.WRITER_EVENTS.labels(outcome="written").inc(result.written)
        metrics.WRITER_EVENTS.labels(outcome="duplicate").inc(result.duplicates)
        for change, n in result.incidents.items():
            metrics.INCIDENTS.labels(change=change).inc(n)
        await self.consumer.commit(offsets)
        metrics.CONSUMER_BATCH_SIZE.labels(group=self.group).observe(sum(len(r) for r in batch.values()))
        metrics.CONSUMER_COMMITS.labels(group=self.group).inc()
        record_lag(self.consumer, self.group, offsets)

    async def _dead_letter(self, record: ConsumerRecord, error: str) -> None:
        headers = dead_letter_headers(
            record.headers,
            error=error,
            stage="writer.decode",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        await self.producer.send_and_wait(self.topics.dlq, value=record.value or b"", key=record.key, headers=headers)
        metrics.DLQ_MESSAGES.labels(stage="writer").inc()
        metrics.WRITER_EVENTS.labels(outcome="dlq").inc()
