"""One consumer runtime for the router and the incident writer (the shape of Sentry's arroyo).

Per batch, in this order, always::

    poll (getmany, at most ``batch_max`` records) → step.process(batch) → dead letters produced
    and acknowledged → commit offset + 1 → metrics (batch size, processing delay, commits, lag)

A service is a :class:`Step`: ``process(batch)`` does the batch's side effect (the router produces
and waits for every acknowledgement; the writer commits one transaction) and returns the records
that can never be processed, as :class:`DeadLetter` values. When it returns, the effect is
durable; only then does the runtime commit. What a step may raise:

- :class:`Retry` — the batch failed because of something outside it (the database is down, a
  conflict with another writer). The runtime pauses every assigned partition, keeps polling (so the
  group keeps this member and its partitions), and retries the same batch with exponential backoff
  until it succeeds, the consumer is stopped, or the batch is abandoned at a rebalance.
- anything else — a bug. It propagates: the consumer stops loudly with the batch uncommitted, and
  the records come again after the fix. Bugs are never dead-lettered.

Dead letters keep the record's bytes and headers and add ``error``, ``stage`` and the original
topic, partition and offset (:func:`shared.kafka.dead_letter_headers`); once the broker acknowledged
them, ``step.dead_lettered`` hears where they are (the writer audits them as failed). Past a budget
(more than ``dlq_max_ratio`` of the last ``dlq_window`` records, from at least ``dlq_min_orgs``
organizations) the runtime raises :class:`DeadLetterLimitExceeded` before producing them: a bad
deploy must not empty a topic into the DLQ — but one tenant's bad records never stop the others.

Rebalances: before partitions are revoked, the in-flight batch gets ``revoke_wait_seconds`` to
finish and commit; past that it is abandoned — no more retries, no commit — and the partitions'
next owner gets its records again (the steps are idempotent). Stop (SIGTERM): the batch in hand
is finished, unless it is waiting for a retry; then it is left uncommitted for the next run.

Offsets: a new group starts at the earliest offset. A committed offset that is out of range (the
topic was truncated by retention past it, or recreated) raises :class:`OffsetOutOfRange` instead
of silently rewinding or skipping: an operator decides (``kafka-consumer-groups --reset-offsets``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
)
from aiokafka.structs import ConsumerRecord, RecordMetadata

from shared import metrics
from shared.events import H_DELIVERY_ID
from shared.kafka import dead_letter_headers, header_value
from shared.producer import Producer, RenewableProducer, acknowledged, is_broken, track
from shared.settings import Settings
from shared.topics import Topics

log = logging.getLogger("blametrail.consumer")

Records = dict[TopicPartition, list[ConsumerRecord]]


class Batch:
    """Records of one poll, per partition in offset order; iterates them in that order."""

    def __init__(self, records: Records) -> None:
        self.records = records
        self.partitions = set(records)
        self.offsets = {tp: rs[-1].offset + 1 for tp, rs in records.items() if rs}

    def __iter__(self) -> Iterator[ConsumerRecord]:
        for records in self.records.values():
            yield from records

    def __len__(self) -> int:
        return sum(len(records) for records in self.records.values())


@dataclass(frozen=True)
class DeadLetter:
    """A record that can never be processed, why (``error``), where it failed (``stage``) and whose
    it is (``org``, when known: the budget tells one tenant's bad records from a systemic failure)."""

    record: ConsumerRecord
    error: str
    stage: str
    org: str | None = None


@dataclass(frozen=True)
class SentLetter:
    """A dead letter the broker acknowledged, and where it is in the dead-letter topic."""

    letter: DeadLetter
    partition: int
    offset: int


class Retry(Exception):
    """The batch could not be applied for a reason outside it; ``reason`` labels the metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class DeadLetterLimitExceeded(RuntimeError):
    """Too many records dead-lettered recently: stop instead of dead-lettering a whole topic."""


class OffsetOutOfRange(RuntimeError):
    """A committed offset no longer exists in its partition; an operator must decide where to resume."""


class Step:
    """What a consumer does with a batch; see the module docstring for the contract."""

    #: the ``stage`` label of ``blametrail_dlq_messages_total`` for this step's dead letters
    name = "consumer"

    async def process(self, batch: Batch) -> Sequence[DeadLetter]:
        raise NotImplementedError

    def retrying(self, failure: Retry, delay: float) -> None:
        """Called when an attempt raised :class:`Retry`, before waiting ``delay`` seconds (also for the
        runtime's own ``Retry("kafka")``: a replacement producer that did not start, dead letters
        Kafka did not take). Logs it; steps add their metrics and wording."""
        log.warning("%s; retrying the batch in %.1fs", failure.message, delay)

    def recovered(self) -> None:
        """Called when an attempt succeeds after one or more retries."""

    async def dead_lettered(self, sent: Sequence[SentLetter]) -> None:
        """Called with the batch's dead letters once the broker acknowledged them, before the commit
        (the writer audits them). May raise :class:`Retry`; it is then retried like ``process``."""


@dataclass(frozen=True)
class ConsumerConfig:
    group: str
    topics: tuple[str, ...]
    dlq_topic: str
    batch_max: int
    batch_timeout_ms: int
    revoke_wait_seconds: float
    dlq_max_ratio: float
    dlq_window: int
    dlq_min_orgs: int = 1
    retry_initial_seconds: float = 0.2
    retry_max_seconds: float = 5.0

    @classmethod
    def of(
        cls,
        settings: Settings,
        *,
        group: str,
        topics: tuple[str, ...],
        dlq_max_ratio: float,
        dlq_window: int,
        batch_max: int | None = None,
        **retry: float,
    ) -> ConsumerConfig:
        """A service's consumer: its group, topics and budget; the shared ``consumer_*`` settings
        (``batch_max`` instead of ``consumer_batch_max`` when given)."""
        return cls(
            group=group,
            topics=topics,
            dlq_topic=Topics.from_settings(settings).dlq,
            batch_max=batch_max or settings.consumer_batch_max,
            batch_timeout_ms=settings.consumer_batch_timeout_ms,
            revoke_wait_seconds=settings.consumer_revoke_wait_seconds,
            dlq_max_ratio=dlq_max_ratio,
            dlq_window=dlq_window,
            dlq_min_orgs=settings.consumer_dlq_min_orgs,
            **retry,
        )  # fmt: skip


class DeadLetterBudget:
    """Allows at most ``max_ratio`` of the last ``window`` records to be dead-lettered — unless they
    belong to fewer than ``min_orgs`` organizations: one tenant's bad records are that tenant's
    problem (dead-lettered and audited), never a reason to stop every tenant. A systemic failure (a
    bad deploy) dead-letters everybody's records and trips the budget."""

    def __init__(self, max_ratio: float, window: int, min_orgs: int = 1) -> None:
        self._limit = max(1, int(max_ratio * window))
        self._min_orgs = max(1, min_orgs)
        self._recent: collections.deque[tuple[bool, str | None]] = collections.deque(maxlen=window)
        self._dead = 0
        self._orgs: collections.Counter[str | None] = collections.Counter()

    def record(self, dead: bool, org: str | None = None) -> None:
        if len(self._recent) == self._recent.maxlen:
            was_dead, was_org = self._recent[0]
            if was_dead:
                self._dead -= 1
                self._orgs[was_org] -= 1
                if not self._orgs[was_org]:
                    del self._orgs[was_org]
        self._recent.append((dead, org))
        if dead:
            self._dead += 1
            self._orgs[org] += 1
        if self._dead > self._limit and len(self._orgs) >= self._min_orgs:
            raise DeadLetterLimitExceeded(
                f"{self._dead} of the last {len(self._recent)} records of {len(self._orgs)} organizations were "
                f"dead-lettered (limit {self._limit}): stopping; fix the cause, then restart"
            )

    def record_batch(self, total: int, dead: Sequence[DeadLetter]) -> None:
        for letter in dead:
            self.record(dead=True, org=letter.org)
        for _ in range(total - len(dead)):
            self.record(dead=False)


class _InFlight:
    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.abandoned = False
        self.done = asyncio.Event()


class ConsumerRuntime(ConsumerRebalanceListener):  # type: ignore[misc]
    """Runs ``step`` over ``config.topics`` in ``config.group``; ``run(stop)`` returns once ``stop`` is set.

    The consumer and the producer (used for dead letters, and shared with the step) are owned by
    the runtime: ``run`` starts and stops them. A producer that broke (``shared.producer.is_broken``:
    ``OutOfOrderSequenceNumber`` forever after a broker restart, a dead sender task) is replaced
    before the batch's next attempt.
    """

    def __init__(
        self, config: ConsumerConfig, step: Step, consumer: AIOKafkaConsumer, producers: RenewableProducer
    ) -> None:
        self.config = config
        self.step = step
        self.consumer = consumer
        self.producers = producers
        self._budget = DeadLetterBudget(config.dlq_max_ratio, config.dlq_window, config.dlq_min_orgs)
        self._inflight: _InFlight | None = None
        self._paused = False

    @property
    def producer(self) -> Producer:
        return self.producers.current

    async def run(self, stop: asyncio.Event) -> None:
        await self.producers.start()
        try:
            self.consumer.subscribe(list(self.config.topics), listener=self)
            await self.consumer.start()
            log.info("%s consuming %s", self.config.group, ", ".join(self.config.topics))
            try:
                while not stop.is_set():
                    records = await self._poll(self.config.batch_timeout_ms, self.config.batch_max)
                    if records:
                        await self._handle(Batch(records), stop)
            finally:
                await self.consumer.stop()
        finally:
            await self.producers.stop()

    async def _poll(self, timeout_ms: int, max_records: int | None = None) -> Records:
        try:
            records: Records = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
            return records
        except NoOffsetForPartitionError as exc:
            # A partition this group never committed: start at its beginning, so nothing is skipped.
            for tp in exc.args:
                if isinstance(tp, TopicPartition):
                    await self.consumer.seek_to_beginning(tp)
            return {}
        except OffsetOutOfRangeError as exc:
            raise OffsetOutOfRange(
                f"group {self.config.group}: committed offsets out of range {exc.args}; the records there are "
                "gone (retention) or the topic was recreated. Choose where to resume with "
                "`kafka-consumer-groups --reset-offsets`, then restart"
            ) from exc

    async def _handle(self, batch: Batch, stop: asyncio.Event) -> None:
        inflight = _InFlight(batch)
        self._inflight = inflight
        try:
            dead = await self._process(inflight, stop)
            if dead is None or inflight.abandoned:
                self._resume()
                return
            try:
                self._budget.record_batch(len(batch), dead)
            except DeadLetterLimitExceeded:
                log.error("too many dead letters (last: %s); stopping with the batch uncommitted", dead[-1].error)
                raise
            sent: list[SentLetter] = []

            async def send_dead_letters() -> None:
                sent[:] = await self._dead_letters(dead)

            if dead and not await self._attempt(send_dead_letters, inflight, stop):
                self._resume()
                return
            if sent and not await self._attempt(lambda: self.step.dead_lettered(sent), inflight, stop):
                self._resume()
                return
            self._observe(batch)
            if inflight.abandoned:
                return
            try:
                await self.consumer.commit(batch.offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                log.warning("batch done but offsets not committed (%s): it will come again, as duplicates", exc)
                return
            metrics.CONSUMER_COMMITS.labels(group=self.config.group).inc()
            self._record_lag(batch.offsets)
        finally:
            self._inflight = None
            inflight.done.set()

    async def _process(self, inflight: _InFlight, stop: asyncio.Event) -> list[DeadLetter] | None:
        """The step's dead letters once an attempt succeeded; None when stopped or abandoned first."""
        dead: list[DeadLetter] = []

        async def process() -> None:
            dead[:] = await self.step.process(inflight.batch)

        return dead if await self._attempt(process, inflight, stop) else None

    async def _attempt(self, work: Callable[[], Awaitable[None]], inflight: _InFlight, stop: asyncio.Event) -> bool:
        """Run ``work`` until it does not raise :class:`Retry` (partitions paused meanwhile, backoff
        doubling); False when the consumer is stopped or the batch abandoned first."""
        delay = self.config.retry_initial_seconds
        retried = False
        while True:
            try:
                try:
                    await self.producers.ready()
                except (KafkaError, TimeoutError) as exc:
                    raise Retry("kafka", f"starting a new Kafka producer failed: {exc!r}") from exc
                await work()
            except Retry as failure:
                if is_broken(self.producer, failure.__cause__):
                    self.producers.broken(f"{type(failure.__cause__).__name__}: {failure.message}")
                if not (stop.is_set() or inflight.abandoned):
                    retried = True
                    self.step.retrying(failure, delay)
                    self._paused = True
                    self._pause_assigned()
                    await self._wait_paused(delay, inflight, stop)
                if stop.is_set() or inflight.abandoned:
                    why = "stopping" if stop.is_set() else "abandoned at a rebalance"
                    log.warning("batch of %d left uncommitted (%s): it will be redelivered", len(inflight.batch), why)
                    return False
                delay = min(delay * 2, self.config.retry_max_seconds)
                continue
            if retried:
                self.step.recovered()
            self._resume()
            return True

    async def _wait_paused(self, seconds: float, inflight: _InFlight, stop: asyncio.Event) -> None:
        """Wait ``seconds`` while polling with every partition paused: heartbeats and the poll
        interval stay satisfied, so the group keeps this member and its partitions."""
        deadline = time.monotonic() + seconds
        while not (stop.is_set() or inflight.abandoned):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._pause_assigned()
            fetched = await self._poll(max(1, int(min(remaining, 0.5) * 1000)))
            for tp, records in fetched.items():
                # Only partitions assigned since the pause can return records: put them back.
                self.consumer.seek(tp, records[0].offset)

    def _pause_assigned(self) -> None:
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.pause(*assignment)

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            assignment = self.consumer.assignment()
            if assignment:
                self.consumer.resume(*assignment)

    async def _dead_letters(self, dead: Sequence[DeadLetter]) -> list[SentLetter]:
        """Produce ``dead`` to the dead-letter topic and wait for every acknowledgement; a Kafka failure
        is a :class:`Retry` (all of them are sent again: the DLQ may hold a record twice, never zero times)."""
        futures: list[asyncio.Future[object]] = []
        try:
            for letter in dead:
                record = letter.record
                delivery = header_value(record.headers or (), H_DELIVERY_ID)
                log.warning("dead-lettering %s[%d]@%d (%s): %s", record.topic, record.partition, record.offset,
                            letter.stage, letter.error, extra={"delivery_id": delivery, "org": letter.org})  # fmt: skip
                headers = dead_letter_headers(
                    record.headers,
                    error=letter.error,
                    stage=letter.stage,
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                )
                future = await self.producer.send(
                    self.config.dlq_topic, value=record.value or b"", key=record.key, headers=headers
                )
                track(futures, future)
            metas = cast(list[RecordMetadata], await acknowledged(self.producer, futures))
        except KafkaError as exc:
            raise Retry("kafka", f"dead-lettering failed: {exc!r}") from exc
        metrics.DLQ_MESSAGES.labels(stage=self.step.name).inc(len(dead))
        return [SentLetter(letter, meta.partition, meta.offset) for letter, meta in zip(dead, metas, strict=True)]

    def _observe(self, batch: Batch) -> None:
        group = self.config.group
        metrics.CONSUMER_BATCH_SIZE.labels(group=group).observe(len(batch))
        now_ms = time.time() * 1000
        processing = metrics.CONSUMER_PROCESSING_SECONDS.labels(group=group)
        for record in batch:
            processing.observe(max(0.0, (now_ms - record.timestamp) / 1000))

    def _record_lag(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, next_offset in offsets.items():
            end = self.consumer.highwater(tp)
            if end is not None:
                metrics.CONSUMER_LAG.labels(group=self.config.group, topic=tp.topic, partition=str(tp.partition)).set(
                    max(0, end - next_offset)
                )

    # ConsumerRebalanceListener: aiokafka calls these from its coordinator task, maybe mid-batch.

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        metrics.CONSUMER_REBALANCES.labels(group=self.config.group, kind="revoked").inc()
        inflight = self._inflight
        if inflight is None or not inflight.batch.partitions & revoked:
            return
        try:
            await asyncio.wait_for(inflight.done.wait(), self.config.revoke_wait_seconds)
        except TimeoutError:
            inflight.abandoned = True
            metrics.CONSUMER_ABANDONED_BATCHES.labels(group=self.config.group).inc()
            log.warning("rebalance: abandoning the in-flight batch (not committed; it will be redelivered)")

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        metrics.CONSUMER_REBALANCES.labels(group=self.config.group, kind="assigned").inc()
        metrics.CONSUMER_ASSIGNED_PARTITIONS.labels(group=self.config.group).set(len(assigned))
        if self._paused and assigned:
            self.consumer.pause(*assigned)  # new partitions stay paused while retrying
