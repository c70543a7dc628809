"""The incident writer: sentry.events.routed + sentry.events.ignored → Postgres.

One consumer group reads both topics. Chain per batch (``getmany``):

    decode → write (one transaction, ``store.write_batch``) → dead-letter → commit offset + 1

- decode: a record that is not a routed/ignored event is dead-lettered (stage ``writer.decode``).
- write: the whole batch in one transaction. An ``IntegrityError``/``DataError`` means a record in
  it can never be written (its service or organisation is gone, a value does not fit): the batch is
  bisected (``isolate.write_isolating``) until those records stand alone; they are dead-lettered
  with the database's reason (stage ``writer.write``) and the rest is written. Any other failure —
  Postgres down or restarting, connection lost, deadlock, timeout — is the database's state, not
  the records': the writer pauses its partitions, keeps polling Kafka (so it keeps its group
  membership and its partitions), retries with exponential backoff and resumes by itself.
- dead-letter: produced and acknowledged by Kafka before the commit. Past a budget
  (``writer_dlq_max_ratio`` of the last ``writer_dlq_window`` records) the writer stops instead,
  with the batch uncommitted: a bad deploy must not empty the topics into the DLQ.
- commit: the batch's offsets, once every record's effect is committed in Postgres or its dead
  letter acknowledged; never before. A crash anywhere earlier redelivers the batch, and the
  idempotent writes absorb the duplicates.

Rebalance: before partitions are revoked, the in-flight batch gets ``writer_revoke_wait_seconds``
to finish (written and committed); past that (the database is away) it is abandoned: nothing of it
is committed and it is redelivered to the partitions' next owner. Stop (SIGTERM): the batch in hand
is finished, unless the database is unavailable — then it is left uncommitted, for the next run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import ConsumerRecord
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.exc import SQLAlchemyError

from incident_writer.isolate import Poison, write_isolating
from incident_writer.store import BatchResult, ConcurrentIncident, describe_error, poison_reason, write_batch
from shared import metrics
from shared.db.session import create_engine, sessionmaker
from shared.events import IgnoredEvent, OutputEvent, RoutedEvent
from shared.kafka import dead_letter_headers, make_consumer, make_producer
from shared.runtime import DeadLetterBudget, DeadLetterLimitExceeded, record_lag
from shared.settings import Settings
from shared.topics import Topics

log = logging.getLogger("blametrail.writer")

EVENT = TypeAdapter[OutputEvent](RoutedEvent | IgnoredEvent)

Records = dict[TopicPartition, list[ConsumerRecord]]

# Failures of a write attempt that are the database's state, not the records': retried.
RETRYABLE = (SQLAlchemyError, psycopg.Error, OSError, TimeoutError, ConcurrentIncident)
_CONFLICTS = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


@dataclass(frozen=True)
class Item:
    """A decoded record: the event and where it came from (for its dead letter)."""

    record: ConsumerRecord
    event: OutputEvent


def decode(batch: Records) -> tuple[list[Item], list[tuple[ConsumerRecord, str]]]:
    """The batch's events in stream order, and the records that are no routed/ignored event (with why)."""
    items: list[Item] = []
    invalid: list[tuple[ConsumerRecord, str]] = []
    for records in batch.values():
        for record in records:
            try:
                items.append(Item(record, EVENT.validate_json(record.value or b"")))
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(part) for part in error.get("loc", ()))
                invalid.append((record, f"invalid event: {where + ': ' if where else ''}{error.get('msg', exc)}"))
    return items, invalid


def retry_reason(exc: BaseException) -> str:
    """The ``reason`` label of a retried attempt: conflict (with another writer), timeout or database."""
    if isinstance(exc, ConcurrentIncident) or isinstance(getattr(exc, "orig", None), _CONFLICTS):
        return "conflict"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "database"


class _InFlight:
    """The batch being written: its partitions and next offsets; abandoned at a rebalance if stuck."""

    def __init__(self, batch: Records) -> None:
        self.partitions = set(batch)
        self.offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
        self.abandoned = False
        self.done = asyncio.Event()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Counts rebalances; settles the in-flight batch before its partitions are revoked."""

    def __init__(self, writer: IncidentWriter) -> None:
        self._writer = writer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        metrics.CONSUMER_REBALANCES.labels(group=self._writer.group, kind="revoked").inc()
        await self._writer.settle(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        metrics.CONSUMER_REBALANCES.labels(group=self._writer.group, kind="assigned").inc()
        metrics.CONSUMER_ASSIGNED_PARTITIONS.labels(group=self._writer.group).set(len(assigned))
        self._writer.assigned(assigned)


class IncidentWriter:
    """Consumes routed + ignored events and writes audit records, incidents and timelines.

    ``run(stop)`` returns when ``stop`` is set (after finishing or leaving the batch in hand). It
    survives database outages and poison records; it raises :class:`DeadLetterLimitExceeded` past
    the dead-letter budget, and Kafka errors it cannot handle propagate.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.group = settings.writer_group
        self._engine = create_engine(settings, pool_size=2)
        self._sessions = sessionmaker(self._engine)
        self.consumer: AIOKafkaConsumer = make_consumer(settings, group_id=self.group, client_id="blametrail-writer")
        self.producer: AIOKafkaProducer = make_producer(settings, client_id="blametrail-writer")
        self._dead_letters = DeadLetterBudget(settings.writer_dlq_max_ratio, settings.writer_dlq_window)
        self._inflight: _InFlight | None = None
        self._paused = False
        self._unavailable_since: float | None = None

    async def run(self, stop: asyncio.Event) -> None:
        await self.producer.start()
        try:
            self.consumer.subscribe([self.topics.routed, self.topics.ignored], listener=_Rebalance(self))
            await self.consumer.start()
            log.info("writer consuming %s, %s", self.topics.routed, self.topics.ignored)
            metrics.WRITER_DATABASE_UP.set(1)
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
        finally:
            await self.producer.stop()
            await self._engine.dispose()

    async def handle_batch(self, batch: Records, stop: asyncio.Event) -> None:
        """decode → write → dead-letter → commit one batch; see the module docstring."""
        inflight = _InFlight(batch)
        self._inflight = inflight
        try:
            await self._handle(batch, inflight, stop)
        finally:
            self._inflight = None
            inflight.done.set()

    async def _handle(self, batch: Records, inflight: _InFlight, stop: asyncio.Event) -> None:
        items, invalid = decode(batch)
        metrics.CONSUMER_BATCH_SIZE.labels(group=self.group).observe(len(items) + len(invalid))
        written = await self._write(items, inflight, stop)
        if written is None or inflight.abandoned:
            # Left uncommitted: whoever owns the partitions now (maybe this writer) gets the records
            # again; the next batch probes the database and pauses again if it is still away.
            self._resume()
            return
        result, poison = written
        dead = [(record, error, "writer.decode") for record, error in invalid]
        dead += [(p.item.record, p.reason, "writer.write") for p in poison]
        try:
            for n in range(len(items) + len(invalid)):
                self._dead_letters.record(dead=n < len(dead))
        except DeadLetterLimitExceeded:
            log.error("too many dead letters (last: %s); stopping with the batch uncommitted", dead[-1][1])
            raise
        for record, error, stage in dead:
            await self._dead_letter(record, error, stage)
        self._observe(batch, result)
        if inflight.abandoned:
            return
        try:
            await self.consumer.commit(inflight.offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("batch written but offsets not committed (%s): it will come again, as duplicates", exc)
            return
        metrics.CONSUMER_COMMITS.labels(group=self.group).inc()
        record_lag(self.consumer, self.group, inflight.offsets)

    async def _write(
        self, items: Sequence[Item], inflight: _InFlight, stop: asyncio.Event
    ) -> tuple[BatchResult, list[Poison[Item]]] | None:
        """Write ``items`` until it succeeds; None when stopped or abandoned first (nothing to commit)."""
        delay = self.settings.writer_retry_initial_seconds
        while True:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.settings.writer_write_timeout_seconds):
                    results, poison = await write_isolating(items, self._transaction, poison_reason)
            except RETRYABLE as exc:
                reason = retry_reason(exc)
                metrics.WRITER_EVENTS.labels(outcome="error").inc(len(items))
                metrics.WRITER_RETRIES.labels(reason=reason).inc()
                if not (stop.is_set() or inflight.abandoned):
                    self._unavailable(exc, reason, delay)
                    await self._wait_paused(delay, inflight, stop)
                if stop.is_set() or inflight.abandoned:
                    why = "stopping" if stop.is_set() else "abandoned at a rebalance"
                    log.warning("batch of %d left uncommitted (%s): it will be redelivered", len(items), why)
                    return None
                delay = min(delay * 2, self.settings.writer_retry_max_seconds)
                continue
            metrics.WRITER_BATCH_SECONDS.observe(time.perf_counter() - started)
            self._available()
            total = BatchResult()
            for result in results:
                total.add(result)
            return total, poison

    async def _transaction(self, items: Sequence[Item]) -> BatchResult:
        async with self._sessions() as session, session.begin():
            result: BatchResult = await write_batch(session, [item.event for item in items])
            return result

    def _unavailable(self, exc: BaseException, reason: str, delay: float) -> None:
        """A failed attempt: pause every assigned partition until the next attempt succeeds."""
        error = describe_error(exc)
        if reason == "conflict":
            log.info("batch conflicted with another writer (%s); retrying in %.1fs", error, delay)
        elif self._unavailable_since is None:
            self._unavailable_since = time.monotonic()
            metrics.WRITER_DATABASE_UP.set(0)
            log.warning("database unavailable (%s); pausing consumption, retrying in %.1fs", error, delay)
        else:
            down = time.monotonic() - self._unavailable_since
            log.warning("database still unavailable after %.0fs (%s); retrying in %.1fs", down, error, delay)
        self._paused = True
        self._pause_assigned()

    def _available(self) -> None:
        if self._unavailable_since is not None:
            log.warning("database available again after %.1fs; resuming", time.monotonic() - self._unavailable_since)
            self._unavailable_since = None
            metrics.WRITER_DATABASE_UP.set(1)
        self._resume()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            assignment = self.consumer.assignment()
            if assignment:
                self.consumer.resume(*assignment)

    def _pause_assigned(self) -> None:
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.pause(*assignment)

    async def _wait_paused(self, seconds: float, inflight: _InFlight, stop: asyncio.Event) -> None:
        """Wait ``seconds`` while polling with every partition paused: heartbeats and the poll
        interval stay satisfied, so the group keeps this member and its partitions."""
        deadline = time.monotonic() + seconds
        while not (stop.is_set() or inflight.abandoned):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._pause_assigned()
            fetched = await self.consumer.getmany(timeout_ms=max(1, int(min(remaining, 0.5) * 1000)))
            for tp, records in fetched.items():
                # Only partitions assigned since the pause can return records: put them back.
                self.consumer.seek(tp, records[0].offset)

    async def settle(self, revoked: set[TopicPartition]) -> None:
        """Before ``revoked`` go: let the in-flight batch finish, or abandon it after the revoke wait."""
        inflight = self._inflight
        if inflight is None or not inflight.partitions & revoked:
            return
        try:
            await asyncio.wait_for(inflight.done.wait(), self.settings.writer_revoke_wait_seconds)
        except TimeoutError:
            inflight.abandoned = True
            metrics.WRITER_ABANDONED_BATCHES.inc()
            log.warning("rebalance: abandoning the in-flight batch (not committed; it will be redelivered)")

    def assigned(self, assigned: set[TopicPartition]) -> None:
        """New partitions stay paused while the database is unavailable."""
        if self._paused and assigned:
            self.consumer.pause(*assigned)

    def _observe(self, batch: Records, result: BatchResult) -> None:
        metrics.WRITER_EVENTS.labels(outcome="written").inc(result.written)
        metrics.WRITER_EVENTS.labels(outcome="duplicate").inc(result.duplicates)
        for change, n in result.changes.items():
            metrics.INCIDENTS.labels(change=change).inc(n)
        metrics.WRITER_TIMELINE_EVENTS.inc(result.timeline)
        now_ms = time.time() * 1000
        processing = metrics.CONSUMER_PROCESSING_SECONDS.labels(group=self.group)
        for records in batch.values():
            for record in records:
                processing.observe(max(0.0, (now_ms - record.timestamp) / 1000))

    async def _dead_letter(self, record: ConsumerRecord, error: str, stage: str) -> None:
        log.warning("dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, error)
        headers = dead_letter_headers(
            record.headers,
            error=error,
            stage=stage,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        await self.producer.send_and_wait(self.topics.dlq, value=record.value or b"", key=record.key, headers=headers)
        metrics.DLQ_MESSAGES.labels(stage="writer").inc()
        metrics.WRITER_EVENTS.labels(outcome="dlq").inc()
