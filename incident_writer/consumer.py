"""The incident writer: sentry.events.routed + sentry.events.ignored → Postgres.

One consumer group reads both topics; the runtime (``shared.consumer``) polls, dead-letters, commits
and handles rebalances. The writer's step per batch:

    decode → write (one transaction, ``store.write_batch``) → dead letters → (runtime) commit offset + 1

- decode: a record that is not a routed/ignored event is dead-lettered (stage ``writer.decode``).
- write: the whole batch in one transaction — a large one (``writer_split_min_events`` twice or more)
  as up to ``writer_parallel_writes`` transactions at once, split by record key (:func:`split`), each
  isolated on its own; the batch fails if a part does. An ``IntegrityError``/``DataError`` means a record in
  it can never be written (its service or organisation is gone, a value does not fit): the batch is
  bisected (``isolate.write_isolating``) until those records stand alone; they are dead-lettered
  with the database's reason (stage ``writer.write``) and the rest is written. Any other failure —
  Postgres down or restarting, connection lost, deadlock, timeout — is the database's state, not
  the records': the step raises ``Retry``, and the runtime pauses the partitions, keeps polling
  Kafka (so the writer keeps its group membership and partitions), retries with exponential
  backoff (``writer_retry_initial_seconds`` … ``writer_retry_max_seconds``) and resumes by itself.
- the dead-letter budget is ``writer_dlq_max_ratio`` of the last ``writer_dlq_window`` records;
  rebalances wait ``consumer_revoke_wait_seconds`` for the batch in flight (see ``shared.consumer``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated

import psycopg
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord
from pydantic import Field, TypeAdapter, ValidationError
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from incident_writer.isolate import Poison, write_isolating
from incident_writer.store import (
    TENANT_MISMATCH,
    BatchResult,
    ConcurrentIncident,
    Failure,
    describe_error,
    poison_reason,
    write_batch,
    write_failures,
)
from shared import metrics
from shared.consumer import Batch, ConsumerConfig, ConsumerRuntime, DeadLetter, Retry, SentLetter, Step
from shared.db.session import create_engine, sessionmaker
from shared.events import H_DELIVERY_ID, H_ORG, H_REPLAY_ID, IgnoredEvent, OutputEvent, RoutedEvent
from shared.kafka import header_value, make_consumer, make_consumer_producer
from shared.logs import EventLog
from shared.producer import RenewableProducer
from shared.settings import Settings
from shared.topics import Topics

log = logging.getLogger("blametrail.writer")

EVENT = TypeAdapter[OutputEvent](RoutedEvent | IgnoredEvent)
# The same models, picked by the record's ``outcome`` instead of trying both (a third of the cost).
# A record without ``outcome`` (the contract does not require it) falls back to :data:`EVENT`, which
# also gives every invalid record its error message: what is accepted, and how, does not change.
_TAGGED = TypeAdapter[OutputEvent](Annotated[RoutedEvent | IgnoredEvent, Field(discriminator="outcome")])

# Failures of a write attempt that are the database's state, not the records': retried.
RETRYABLE = (SQLAlchemyError, psycopg.Error, OSError, TimeoutError, ConcurrentIncident)
_CONFLICTS = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


@dataclass(frozen=True)
class Item:
    """A decoded record: the event and where it came from (for its dead letter)."""

    record: ConsumerRecord
    event: OutputEvent


def decode(records: Iterable[ConsumerRecord]) -> tuple[list[Item], list[tuple[ConsumerRecord, str]]]:
    """The events in stream order, and the records that are no routed/ignored event (with why)."""
    items: list[Item] = []
    invalid: list[tuple[ConsumerRecord, str]] = []
    for record in records:
        try:
            event = _validate(record.value or b"")
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error.get("loc", ()))
            invalid.append((record, f"invalid event: {where + ': ' if where else ''}{error.get('msg', exc)}"))
            continue
        replay_id = _replay_id(record)
        if replay_id:
            # A routed/ignored record republished by a replay: the replay that reprocessed it.
            metrics.REPLAYED_RECORDS.labels(topic=event.outcome).inc()
            if replay_id != event.replay_id:
                event = event.model_copy(update={"replay_id": replay_id})
        items.append(Item(record, event))
    return items, invalid


def split(items: Sequence[Item], parts: int, min_events: int) -> list[list[Item]]:
    """``items`` as the transactions that write them at once: at most ``parts``, of about ``min_events``
    or more each, by Kafka record key, each in stream order.

    The router keeps a Sentry issue's (or alert's) records under one key, on one partition of each
    topic, so a key's records — all the order Kafka keeps and the writer relies on — stay together
    and in order in one transaction, and so do the incidents they reach. What parts do share (an
    incident reached under two keys, a mapping they both learn about) is locked in the store's one
    global order, as between two writers: a part may wait for another, never deadlock with it.
    """
    n = min(parts, len(items) // min_events)
    if n < 2:
        return [list(items)]
    groups: list[list[Item]] = [[] for _ in range(n)]
    for item in items:
        key = item.record.key
        groups[(zlib.crc32(key) if key is not None else item.record.partition) % n].append(item)
    return [group for group in groups if group]


def _validate(value: bytes) -> OutputEvent:
    try:
        return _TAGGED.validate_json(value)
    except ValidationError:
        return EVENT.validate_json(value)


def _header(record: ConsumerRecord, name: str) -> str | None:
    value = header_value(record.headers or (), name)
    return value[:100] if value else None


def _replay_id(record: ConsumerRecord) -> str | None:
    replay_id = _header(record, H_REPLAY_ID)
    return replay_id[:64] if replay_id else None


def _coordinates(record: ConsumerRecord) -> tuple[str, int, int]:
    return (record.topic, record.partition, record.offset)


def retry_reason(exc: BaseException) -> str:
    """The ``reason`` label of a retried attempt: conflict (with another writer), timeout or database."""
    if isinstance(exc, (ConcurrentIncident, *_CONFLICTS)) or isinstance(getattr(exc, "orig", None), _CONFLICTS):
        return "conflict"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "database"


class WriterStep(Step):
    """decode → write (one transaction, poison isolated) for one batch; see the module docstring."""

    name = "writer"

    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.settings = settings
        self._sessions = sessions
        self._unavailable_since: float | None = None
        # The batch's records that could not be applied (by their coordinates): the event and the
        # audit reason, for ``dead_lettered``.
        self._failed: dict[tuple[str, int, int], tuple[OutputEvent, str]] = {}
        self.lines = EventLog(log)  # one "written"/"duplicate" line a delivery, written once a batch

    async def process(self, batch: Batch) -> list[DeadLetter]:
        items, invalid = decode(batch)
        parts = split(items, self.settings.writer_parallel_writes, self.settings.writer_split_min_events)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.writer_write_timeout_seconds):
                results, poison = await self._write(parts)
        except RETRYABLE as exc:
            metrics.WRITER_EVENTS.labels(outcome="error").inc(len(items))
            raise Retry(retry_reason(exc), describe_error(exc)) from exc
        metrics.WRITER_BATCH_SECONDS.observe(time.perf_counter() - started)
        total = BatchResult()
        for result in results:
            total.add(result)
        self._observe(total)
        for item in items:
            e = item.event
            key = (e.delivery_id, e.project_slug)
            self.lines.add(
                "written" if key in total.applied else "duplicate",
                delivery_id=e.delivery_id, org=e.org, project=e.project_slug, outcome=e.outcome, replay_id=e.replay_id,
            )  # fmt: skip
        self.lines.flush()
        dead = [DeadLetter(record, error, "writer.decode", _header(record, H_ORG)) for record, error in invalid]
        self._failed = {}
        by_event = {id(item.event): item for item in items}
        refused = [(by_event[id(event)], reason, TENANT_MISMATCH) for event, reason in total.refused]
        for item, error, reason in [*((p.item, p.reason, "rejected") for p in poison), *refused]:
            dead.append(DeadLetter(item.record, error, "writer.write", item.event.org))
            self._failed[_coordinates(item.record)] = (item.event, reason)
        metrics.WRITER_EVENTS.labels(outcome="dlq").inc(len(dead))
        return dead

    async def _write(self, parts: list[list[Item]]) -> tuple[list[BatchResult], list[Poison[Item]]]:
        """Each part in its own transaction (poison isolated), all at once. Every part runs to its end;
        then a failure is raised — a bug's before the database's — and the parts written stay written
        (the batch's retry finds them as duplicates). Poison comes part after part: a key's records,
        all in one part, keep their order (the dead-letter topic is keyed too)."""
        if len(parts) == 1:
            return await write_isolating(parts[0], self._transaction, poison_reason)
        written = await asyncio.gather(
            *(write_isolating(part, self._transaction, poison_reason) for part in parts), return_exceptions=True
        )
        errors = [outcome for outcome in written if isinstance(outcome, BaseException)]
        if errors:
            raise next((e for e in errors if not isinstance(e, RETRYABLE)), errors[0])
        results: list[BatchResult] = []
        poison: list[Poison[Item]] = []
        for outcome in written:
            assert not isinstance(outcome, BaseException)
            results += outcome[0]
            poison += outcome[1]
        return results, poison

    async def dead_lettered(self, sent: Sequence[SentLetter]) -> None:
        """Audit every dead letter as ``failed`` (reason, error, where it is in the DLQ): no accepted
        webhook ends without an audit record. A letter with no delivery id (not a routed/ignored
        record at all) has nothing to audit."""
        failures = [f for f in (self._failure(s) for s in sent) if f is not None]
        if not failures:
            return
        try:
            async with self._sessions() as session, session.begin():
                written = await write_failures(session, failures)
        except (IntegrityError, DataError) as exc:
            log.error("could not audit %d failed records: %s", len(failures), describe_error(exc))
            metrics.WRITER_EVENTS.labels(outcome="unaudited").inc(len(failures))
            return
        except RETRYABLE as exc:
            raise Retry(retry_reason(exc), describe_error(exc)) from exc
        metrics.WRITER_EVENTS.labels(outcome="failed").inc(written)

    def _failure(self, sent: SentLetter) -> Failure | None:
        record = sent.letter.record
        coordinates = _coordinates(record)
        dlq = (sent.partition, sent.offset)
        found = self._failed.get(coordinates)
        if found is not None:
            event, reason = found
            return Failure(
                delivery_id=event.delivery_id,
                org=event.org,
                reason=reason,
                error=sent.letter.error,
                raw=coordinates,
                dlq=dlq,
                received_at=event.received_at,
                project_slug=event.project_slug,
                resource=event.resource,
                action=event.action,
                sentry_issue_id=event.sentry_issue_id,
                title=event.title,
            )
        delivery, org = _header(record, H_DELIVERY_ID), _header(record, H_ORG)
        if delivery is None or org is None:
            return None
        return Failure(delivery_id=delivery, org=org, reason="invalid_event", error=sent.letter.error, raw=coordinates,
                       dlq=dlq)  # fmt: skip

    async def _transaction(self, items: Sequence[Item]) -> BatchResult:
        async with self._sessions() as session, session.begin():
            result: BatchResult = await write_batch(session, [item.event for item in items])
            return result

    def retrying(self, failure: Retry, delay: float) -> None:
        metrics.WRITER_RETRIES.labels(reason=failure.reason).inc()
        if failure.reason == "kafka":  # the runtime's: a producer that did not start, dead letters not taken
            super().retrying(failure, delay)
        elif failure.reason == "conflict":
            log.info("batch conflicted with another writer (%s); retrying in %.1fs", failure.message, delay)
        elif self._unavailable_since is None:
            self._unavailable_since = time.monotonic()
            metrics.WRITER_DATABASE_UP.set(0)
            log.warning("database unavailable (%s); pausing consumption, retrying in %.1fs", failure.message, delay)
        else:
            down = time.monotonic() - self._unavailable_since
            log.warning("database still unavailable after %.0fs (%s); retrying in %.1fs", down, failure.message, delay)

    def recovered(self) -> None:
        if self._unavailable_since is not None:
            log.warning("database available again after %.1fs; resuming", time.monotonic() - self._unavailable_since)
            self._unavailable_since = None
            metrics.WRITER_DATABASE_UP.set(1)

    @staticmethod
    def _observe(result: BatchResult) -> None:
        metrics.WRITER_EVENTS.labels(outcome="written").inc(result.written)
        metrics.WRITER_EVENTS.labels(outcome="duplicate").inc(result.duplicates)
        for change, n in result.changes.items():
            metrics.INCIDENTS.labels(change=change).inc(n)
        metrics.WRITER_TIMELINE_EVENTS.inc(result.timeline)


class IncidentWriter:
    """The writer service: the consumer runtime over :class:`WriterStep`, reading routed + ignored.

    ``run(stop)`` returns when ``stop`` is set (after finishing or leaving the batch in hand). It
    survives database outages and poison records; it raises ``DeadLetterLimitExceeded`` past the
    dead-letter budget, and Kafka errors it cannot handle propagate.
    """

    def __init__(self, settings: Settings) -> None:
        self.topics = Topics.from_settings(settings)
        self._engine = create_engine(settings, pool_size=max(2, settings.writer_parallel_writes))
        producers = RenewableProducer(
            lambda: make_consumer_producer(settings, client_id="blametrail-writer"),
            settings.writer_group,
        )
        config = ConsumerConfig.of(
            settings,
            group=settings.writer_group,
            topics=(self.topics.routed, self.topics.ignored),
            dlq_max_ratio=settings.writer_dlq_max_ratio,
            dlq_window=settings.writer_dlq_window,
            batch_max=settings.writer_batch_max,
            retry_initial_seconds=settings.writer_retry_initial_seconds,
            retry_max_seconds=settings.writer_retry_max_seconds,
        )
        consumer = make_consumer(settings, group_id=config.group, client_id="blametrail-writer")
        step = WriterStep(settings, sessionmaker(self._engine))
        self.runtime = ConsumerRuntime(config, step, consumer, producers)

    @property
    def consumer(self) -> AIOKafkaConsumer:
        return self.runtime.consumer

    async def run(self, stop: asyncio.Event) -> None:
        metrics.WRITER_DATABASE_UP.set(1)
        try:
            await self.runtime.run(stop)
        finally:
            await self._engine.dispose()
