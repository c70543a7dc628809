"""Producers that stay usable: aiokafka's producer interface, the errors that break it, replacing it.

aiokafka's idempotent producer retries a batch forever, and some errors leave it broken for good: after
a broker restart it can answer ``OutOfOrderSequenceNumber`` to every later batch of a partition
(aiokafka issue 1017), and a sender task that died leaves its futures unresolved. Whoever sends
replaces such a producer (:func:`is_broken`): ingest's ``ProducerSupervisor``, and for the router and
the writer the consumer runtime, through :class:`RenewableProducer`.

``Producer`` and ``RecordBatch`` are what the services call of ``AIOKafkaProducer`` and its
``BatchBuilder``. :func:`dispose` closes a producer without waiting for its pending records, which
aiokafka has no public call for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from aiokafka.errors import (
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    ProducerFenced,
    UnknownProducerId,
)

from shared import metrics

log = logging.getLogger("blametrail.producer")

# The producer itself is broken: replace it.
FATAL_ERRORS: tuple[type[BaseException], ...] = (
    OutOfOrderSequenceNumber,
    ProducerFenced,
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    UnknownProducerId,
    ProducerClosed,
)
DISPOSE_WITHIN = 2.0  # seconds for each step of closing a broken producer
START_TIMEOUT = 10.0  # seconds a producer may take to start (aiokafka retries its producer id for ever)
ACK_CHECK_SECONDS = 5.0  # how often a wait for acknowledgements checks that the sender task lives


class RecordBatch(Protocol):
    """aiokafka's ``BatchBuilder`` as ingest's drainer and the router use it."""

    def append(
        self, *, timestamp: int | None, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> object | None: ...

    def close(self) -> None: ...


class Producer(Protocol):
    """The part of ``AIOKafkaProducer`` the services use (tests pass fakes)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def flush(self) -> None: ...

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[object]: ...

    def create_batch(self) -> RecordBatch: ...

    async def send_batch(self, batch: RecordBatch, topic: str, *, partition: int) -> asyncio.Future[object]: ...

    async def partitions_for(self, topic: str) -> set[int]: ...


ProducerFactory = Callable[[], Producer]


def retrieve(future: asyncio.Future[object]) -> None:
    """Mark a future's exception as seen: an abandoned send's failure is expected, not news."""
    if not future.cancelled():
        future.exception()


def sender_task(producer: Producer) -> asyncio.Task[object] | None:
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    return task if isinstance(task, asyncio.Task) else None


def sender_alive(producer: Producer) -> bool:
    task = sender_task(producer)
    return task is None or not task.done()


async def dispose(producer: Producer, within: float) -> None:
    """Close ``producer`` now, whatever it still holds (each step bounded by ``within`` seconds).

    aiokafka has no public "close now": with idempotence it retries forever and ``stop()`` waits for
    that, and failing its queued batches by hand trips over its internals. So (aiokafka 0.12-0.14):
    cancel its sender task, let in-flight requests end, close its connections. Its pending futures
    are never resolved; nothing waits on them (direct sends have their own deadline, the drainer
    watches for the producer's retirement). Anything else is just stopped.
    """
    task = sender_task(producer)
    client = getattr(producer, "client", None)
    try:
        if task is None or client is None or not hasattr(producer, "_closed"):
            await asyncio.wait_for(producer.stop(), within)
            return
        if not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=within)
        producer._closed = True  # counts as stopped: no "Unclosed AIOKafkaProducer" warning
        await asyncio.wait_for(client.close(), within)
    except Exception as exc:
        log.warning("Kafka producer did not close cleanly: %r", exc)


def track(futures: list[asyncio.Future[object]], future: asyncio.Future[object]) -> None:
    """Add a send's ``future`` to the ones :func:`acknowledged` waits for; its failure is retrieved
    even when nobody awaits it (a later send raised, or another future's failure was raised first)."""
    future.add_done_callback(retrieve)
    futures.append(future)


async def acknowledged(producer: Producer, futures: list[asyncio.Future[object]]) -> list[object]:
    """Wait until Kafka acknowledged every future (collected with :func:`track`); their results, or
    the first failure raised. aiokafka's idempotent producer retries a batch until the broker takes
    it (an outage is waited out), but a producer whose sender task died never resolves its futures:
    that is checked every ``ACK_CHECK_SECONDS`` (``KafkaError``, so the caller retries with a new
    producer)."""
    pending: set[asyncio.Future[object]] = set(futures)
    while pending:
        done, pending = await asyncio.wait(pending, timeout=ACK_CHECK_SECONDS, return_when=asyncio.FIRST_EXCEPTION)
        for future in done:
            future.result()
        if pending and not sender_alive(producer):
            raise KafkaError("the Kafka producer's sender task died with records unacknowledged")
    return [future.result() for future in futures]


def is_broken(producer: Producer, exc: BaseException | None) -> bool:
    """Whether a send through ``producer`` that failed with ``exc`` means the producer must be replaced."""
    return isinstance(exc, FATAL_ERRORS) or not sender_alive(producer)


class RenewableProducer:
    """The producer a consumer service sends with (``current``), replaced when it is broken.

    ``broken(reason)`` asks for a replacement; ``ready()``, called before each attempt of a batch,
    disposes of the broken one and starts its successor (raising aiokafka's error, or ``TimeoutError``
    past ``START_TIMEOUT``, when the broker cannot be reached: the attempt is retried). ``group`` labels
    ``blametrail_consumer_producer_restarts_total``.
    """

    def __init__(self, factory: ProducerFactory, group: str) -> None:
        self._factory = factory
        self._group = group
        self.current: Producer = factory()
        self._started = False
        self._reason: str | None = None

    async def start(self) -> None:
        await self.current.start()
        self._started = True

    async def stop(self) -> None:
        if self._started and self._reason is None:
            await self.current.stop()
        else:  # never started, or broken: stop() would wait for what it will never deliver
            await dispose(self.current, DISPOSE_WITHIN)

    def broken(self, reason: str) -> None:
        if self._reason is None:
            log.warning("replacing the Kafka producer: %s", reason)
            self._reason = reason

    async def ready(self) -> None:
        if self._reason is None:
            return
        if self._started:
            self._started = False
            await self._renew()
            metrics.CONSUMER_PRODUCER_RESTARTS.labels(group=self._group).inc()
        try:
            await asyncio.wait_for(self.current.start(), START_TIMEOUT)
        except BaseException:
            await self._renew()  # a half-started producer is not started again
            raise
        self._started = True
        self._reason = None

    async def _renew(self) -> None:
        await dispose(self.current, DISPOSE_WITHIN)
        self.current = self._factory()
