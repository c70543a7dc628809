"""Making an accepted webhook durable: Kafka's acknowledgement, or the local spool, in order.

``Publisher.publish`` is the whole contract of ingest's answer:

- ``ACCEPTED``: Kafka acknowledged the record (``acks=all``, idempotent producer) within
  ``publish_timeout_ms``.
- ``SPOOLED``: Kafka did not acknowledge in time (or cannot be reached, or ``ingest_max_inflight``
  direct publishes are already waiting); the record is fsync'd in the spool and a background drainer
  delivers it. The direct send that timed out may still complete later: that record then reaches the
  topic twice, with the same ``delivery_id`` (consumers are idempotent on it).
- ``Unavailable`` (raised): neither worked — the spool is full or unwritable and a last direct attempt
  failed too. The caller answers 503.

Order: while a topic has spooled rows, new records of that topic go to the spool as well, and the
drainer sends them oldest first, so a later webhook never overtakes a spooled one. The drainer builds
at most one record batch per partition per round and starts the next round only when every batch of
the round is resolved; a batch is acknowledged or failed as a whole, so rows of one key (one
partition) reach the topic in spool order, and a row is deleted only after the broker acknowledged it.

The producer is supervised: it is created when Kafka is reachable (ingest starts and serves from the
spool without Kafka), and recreated — counted in ``blametrail_ingest_producer_restarts_total`` — when
it reports a fatal idempotence error (aiokafka issue 1017: ``OutOfOrderSequenceNumber`` forever after a
broker restart), when its sender task died, or when it makes no progress for ``STUCK_AFTER`` seconds
while the broker accepts connections. A replaced producer is closed without waiting for its pending
records: their rows stay in the spool, and a request still waiting for one falls back to the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from aiokafka.errors import (
    CorruptRecordException,
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    ProducerFenced,
    RecordListTooLargeError,
    UnknownProducerId,
    UnsupportedForMessageFormatError,
)
from aiokafka.partitioner import murmur2

from ingest.spool import AsyncSpool, SpooledMessage, SpoolError, SpoolRow
from shared import metrics

log = logging.getLogger("blametrail.ingest.publisher")

STUCK_AFTER = 10.0
START_TIMEOUT = 10.0
SEND_TIMEOUT = 5.0
FOREIGN_TOPIC_RETRY = 30.0
ORPHAN_SCAN_SECONDS = 60.0
DRAIN_ROWS = 500
DRAIN_BYTES = 4 * 1024 * 1024

# The producer itself is broken: recreate it.
FATAL_ERRORS: tuple[type[BaseException], ...] = (
    OutOfOrderSequenceNumber,
    ProducerFenced,
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    UnknownProducerId,
    ProducerClosed,
)
# The record itself is refused for good: retrying cannot help.
RECORD_ERRORS: tuple[type[BaseException], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    CorruptRecordException,
    UnsupportedForMessageFormatError,
)


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    SPOOLED = "spooled"


class Unavailable(Exception):
    """Neither Kafka nor the spool could make the webhook durable: answer 503 with Retry-After."""


class RecordBatch(Protocol):
    """aiokafka's ``BatchBuilder`` as the drainer uses it."""

    def append(
        self, *, timestamp: int | None, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> object | None: ...

    def close(self) -> None: ...


class Producer(Protocol):
    """The part of ``AIOKafkaProducer`` ingest uses."""

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


def partition_for(key: bytes, partitions: Sequence[int]) -> int:
    """The partition aiokafka's default partitioner (murmur2, as the Java client) picks for ``key``."""
    index: int = (murmur2(key) & 0x7FFFFFFF) % len(partitions)
    return partitions[index]


def bootstrap_addresses(bootstrap: str) -> list[tuple[str, int]]:
    """``host:port`` pairs of a bootstrap string (``[v6]:port`` allowed; port 9092 by default)."""
    out: list[tuple[str, int]] = []
    for item in bootstrap.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or "]" in port:
            host, port = item, "9092"
        out.append((host.strip("[]"), int(port)))
    return out


def _retrieve(future: asyncio.Future[object]) -> None:
    """Mark a future's exception as seen: an abandoned send's failure is expected, not news."""
    if not future.cancelled():
        future.exception()


def _sender_task(producer: Producer) -> asyncio.Task[object] | None:
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    return task if isinstance(task, asyncio.Task) else None


def _sender_alive(producer: Producer) -> bool:
    task = _sender_task(producer)
    return task is None or not task.done()


async def _dispose(producer: Producer, within: float) -> None:
    """Close ``producer`` now, whatever it still holds (each step bounded by ``within`` seconds).

    aiokafka has no public "close now": with idempotence it retries forever and ``stop()`` waits for
    that, and failing its queued batches by hand trips over its internals. So (aiokafka 0.12-0.14):
    cancel its sender task, let in-flight requests end, close its connections. Its pending futures
    are never resolved; nothing waits on them (direct sends have their own deadline, the drainer
    watches for the producer's retirement). Anything else is just stopped.
    """
    task = _sender_task(producer)
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


async def _dispose_cleanly(producer: Producer, within: float) -> None:
    """``stop()`` a producer that has nothing left to deliver; ``_dispose`` it if that hangs."""
    try:
        await asyncio.wait_for(producer.stop(), within)
    except Exception as exc:
        log.warning("Kafka producer did not stop cleanly (%r): closing it", exc)
        await _dispose(producer, within)


async def _until(event: asyncio.Event) -> object:
    return await event.wait()


@dataclass
class _Batch:
    builder: RecordBatch
    rows: list[SpoolRow] = field(default_factory=list)


class Publisher:
    """Publishes to ``topic`` directly or through ``spool``; see the module docstring for the contract.

    ``start`` launches the producer supervisor, the drainer and the watchdog; ``close`` stops them,
    flushes the producer (bounded by ``grace``) and releases the spool with its rows still in it.
    """

    def __init__(
        self,
        spool: AsyncSpool,
        factory: ProducerFactory,
        *,
        topic: str,
        publish_timeout: float,
        max_inflight: int,
        bootstrap: str,
    ) -> None:
        self._spool = spool
        self._factory = factory
        self._topic = topic
        self._timeout = publish_timeout
        self._max_inflight = max_inflight
        self._bootstrap = bootstrap_addresses(bootstrap)
        self._producer: Producer | None = None
        self._producer_started = 0.0
        self._restart_reason = ""
        self._inflight = 0
        self._spool_pending: defaultdict[str, int] = defaultdict(int)
        self._single_row: set[tuple[str, int]] = set()
        self._foreign_next_try: dict[str, float] = {}
        self._progress_at = time.monotonic()
        self._stop = asyncio.Event()
        self._restart = asyncio.Event()
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._retired = asyncio.Event()  # set when the current producer is replaced or shut down
        self._first_attempt = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()

    # --- state --------------------------------------------------------------------------------

    @property
    def producer(self) -> Producer | None:
        """The current producer (None while there is none)."""
        return self._producer

    @property
    def producer_connected(self) -> bool:
        return self._producer is not None

    @property
    def spool_writable(self) -> bool:
        return self._spool.writable

    @property
    def spool(self) -> AsyncSpool:
        return self._spool

    def _direct_allowed(self, topic: str) -> bool:
        return (
            self._producer is not None
            and not self._restart.is_set()
            and self._spool.depth(topic) == 0
            and self._spool_pending[topic] == 0
            and self._inflight < self._max_inflight
        )

    def _progress(self) -> None:
        self._progress_at = time.monotonic()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, wait_connected: float = 5.0) -> None:
        """Start the background tasks; wait for the first producer start attempt, at most
        ``wait_connected`` seconds (ingest serves from the spool if Kafka is not there)."""
        self._tasks = [
            asyncio.create_task(self._supervise(), name="ingest-producer"),
            asyncio.create_task(self._drain(), name="ingest-drainer"),
            asyncio.create_task(self._watch(), name="ingest-watchdog"),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), wait_connected)

    async def close(self, grace: float = 2.0) -> None:
        """Stop draining, flush the producer, release the spool. Bounded by about ``2 * grace``.

        Spooled rows not yet acknowledged stay in the spool file for the next start.
        """
        self._stop.set()
        self._wake.set()
        supervisor, drainer, watchdog = self._tasks or (None, None, None)
        if watchdog is not None:
            watchdog.cancel()
        kafka_answers = True
        if drainer is not None:
            done, _ = await asyncio.wait([drainer], timeout=grace)
            if not done:
                kafka_answers = False
                self._retired.set()  # stop waiting for the round's acknowledgements
                done, _ = await asyncio.wait([drainer], timeout=1.0)
                if not done:
                    drainer.cancel()
        if supervisor is not None:  # it may be inside a producer start() that hangs
            done, _ = await asyncio.wait([supervisor], timeout=grace)
            if not done:
                supervisor.cancel()
        for task in (supervisor, drainer, watchdog):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        producer, self._producer = self._producer, None
        self._connected.clear()
        if producer is not None and not kafka_answers:
            await _dispose(producer, grace)
        elif producer is not None:
            try:
                await asyncio.wait_for(producer.flush(), grace)
            except Exception as exc:
                log.warning("Kafka producer did not flush within %.0fs (%r): its records are spooled", grace, exc)
                await _dispose(producer, grace)
            else:
                await _dispose_cleanly(producer, grace)
        if self._closing:
            await asyncio.wait(self._closing, timeout=grace)
        await self._spool.close()

    def _retire(self, producer: Producer, reason: str) -> None:
        """Dispose of ``producer`` in the background (nothing waits for its records any more)."""
        task = asyncio.create_task(_dispose(producer, START_TIMEOUT))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def request_restart(self, producer: Producer | None, reason: str) -> None:
        """Ask the supervisor to replace ``producer`` (ignored if it was replaced already)."""
        if producer is None or producer is not self._producer or self._restart.is_set():
            return
        self._restart_reason = reason
        self._restart.set()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; True when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def _supervise(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                producer = self._factory()
            except Exception:
                log.exception("cannot create a Kafka producer")
                if await self._sleep(5.0):
                    return
                continue
            try:
                await asyncio.wait_for(producer.start(), START_TIMEOUT)
            except asyncio.CancelledError:
                await _dispose(producer, 1.0)
                raise
            except Exception as exc:
                self._first_attempt.set()
                log.warning("Kafka producer cannot start (%r): spooling; next try in %.1fs", exc, backoff)
                self._retire(producer, "start failed")
                if await self._sleep(backoff):
                    return
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.2
            self._retired = asyncio.Event()
            self._producer = producer
            self._producer_started = time.monotonic()
            self._restart.clear()
            self._connected.set()
            self._first_attempt.set()
            self._wake.set()
            log.info("Kafka producer connected")
            stop = asyncio.create_task(self._stop.wait())
            restart = asyncio.create_task(self._restart.wait())
            try:
                await asyncio.wait([stop, restart], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                restart.cancel()
            if self._stop.is_set():
                return  # close() flushes and stops the current producer
            self._producer = None
            self._connected.clear()
            self._retired.set()
            metrics.INGEST_PRODUCER_RESTARTS.inc()
            log.warning("recreating the Kafka producer: %s", self._restart_reason)
            self._retire(producer, self._restart_reason)

    async def _watch(self) -> None:
        """Restart a producer that makes no progress while the broker accepts connections."""
        reachable_since: float | None = None
        while not await self._sleep(1.0):
            producer = self._producer
            if producer is None:
                reachable_since = None
                continue
            if not _sender_alive(producer):
                self.request_restart(producer, "its sender task died")
                continue
            now = time.monotonic()
            outstanding = self._spool.depth(self._topic) > 0 or self._inflight > 0
            if not outstanding:
                self._progress()
            if not outstanding or now - self._progress_at < STUCK_AFTER:
                reachable_since = None
                continue
            if not await self._broker_reachable():
                reachable_since = None
                continue
            reachable_since = reachable_since or now
            if now - reachable_since >= STUCK_AFTER and now - self._producer_started >= STUCK_AFTER:
                self.request_restart(
                    producer, f"no acknowledgement for {now - self._progress_at:.0f}s while Kafka is up"
                )
                reachable_since = None

    async def _broker_reachable(self) -> bool:
        for host, port in self._bootstrap:
            try:
                async with asyncio.timeout(1.0):
                    _, writer = await asyncio.open_connection(host, port)
            except (OSError, TimeoutError):
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        return False

    # --- publishing ---------------------------------------------------------------------------

    async def publish(self, message: SpooledMessage) -> Outcome:
        """Make ``message`` durable; raises ``Unavailable`` when neither Kafka nor the spool can."""
        tried_direct = False
        if self._direct_allowed(message.topic):
            tried_direct = True
            if await self._send_direct(message):
                return Outcome.ACCEPTED
        try:
            await self._to_spool(message)
        except SpoolError as exc:
            # Durability beats order: a last direct attempt rather than losing the webhook.
            if not tried_direct and await self._send_direct(message):
                log.warning("spool refused a webhook (%s): published directly, out of spool order", exc)
                return Outcome.ACCEPTED
            raise Unavailable(str(exc)) from exc
        return Outcome.SPOOLED

    async def _send_direct(self, message: SpooledMessage) -> bool:
        producer = self._producer
        if producer is None:
            return False
        if self._inflight == 0:
            self._progress()
        self._inflight += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                future = await producer.send(
                    message.topic,
                    value=message.value,
                    key=message.key,
                    timestamp_ms=message.timestamp_ms,
                    headers=list(message.headers),
                )
                future.add_done_callback(_retrieve)
                await asyncio.shield(future)
        except TimeoutError:
            return False
        except Exception as exc:
            self._on_error(producer, exc)
            return False
        finally:
            self._inflight -= 1
        metrics.INGEST_PUBLISH_SECONDS.observe(time.perf_counter() - started)
        self._progress()
        return True

    def _on_error(self, producer: Producer, exc: BaseException) -> None:
        if isinstance(exc, FATAL_ERRORS) or not _sender_alive(producer):
            self.request_restart(producer, f"{type(exc).__name__}: {exc}")

    async def _to_spool(self, message: SpooledMessage) -> None:
        self._spool_pending[message.topic] += 1
        try:
            await self._spool.append(message)
        finally:
            self._spool_pending[message.topic] -= 1
        self._wake.set()

    # --- draining -----------------------------------------------------------------------------

    def _next_topic(self) -> str | None:
        """The topic to drain next: ours first; others (from adopted spool files) now and then."""
        if self._spool.depth(self._topic):
            return self._topic
        now = time.monotonic()
        for topic, depth in self._spool.stats.depth.items():
            if depth and self._foreign_next_try.get(topic, 0.0) <= now:
                return topic
        return None

    async def _drain(self) -> None:
        backoff = 0.1
        next_scan = time.monotonic() + ORPHAN_SCAN_SECONDS
        while not self._stop.is_set():
            if time.monotonic() >= next_scan:
                next_scan = time.monotonic() + ORPHAN_SCAN_SECONDS
                with contextlib.suppress(SpoolError):
                    await self._spool.adopt_orphans()
            topic = self._next_topic()
            producer = self._producer
            if topic is None or producer is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            try:
                await self._drain_round(producer, self._retired, topic)
            except Exception as exc:
                self._on_error(producer, exc)
                if topic != self._topic:
                    self._foreign_next_try[topic] = time.monotonic() + FOREIGN_TOPIC_RETRY
                    log.warning("spooled webhooks for topic %s cannot be delivered yet (%r)", topic, exc)
                    continue
                log.debug("drain round failed (%r); retrying in %.1fs", exc, backoff)
                if await self._sleep(backoff):
                    return
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1

    async def _drain_round(self, producer: Producer, retired: asyncio.Event, topic: str) -> None:
        """Send the oldest rows of ``topic``: one batch per partition, delete what was acknowledged.

        Waits until every batch of the round is resolved (or ``producer`` is retired: the rest of the
        round is then sent again by its successor), then raises the first failure, if any.
        """
        rows = await self._spool.peek(topic, DRAIN_ROWS, DRAIN_BYTES)
        if not rows:
            return
        timeout = SEND_TIMEOUT if topic == self._topic else 2.0
        async with asyncio.timeout(timeout):
            partitions = sorted(await producer.partitions_for(topic))
        batches: dict[int, _Batch] = {}
        closed: set[int] = set()
        for row in rows:
            m = row.message
            p = partition_for(m.key, partitions)
            if p in closed:
                continue
            batch = batches.get(p)
            if batch is None:
                batch = batches[p] = _Batch(producer.create_batch())
            elif (topic, p) in self._single_row:
                closed.add(p)
                continue
            if (
                batch.builder.append(timestamp=m.timestamp_ms, key=m.key, value=m.value, headers=list(m.headers))
                is None
            ):
                closed.add(p)  # full: this partition's later rows wait for the next round
                continue
            batch.rows.append(row)

        futures: dict[int, asyncio.Future[object]] = {}
        failure: BaseException | None = None
        for p, batch in batches.items():
            batch.builder.close()
            try:
                async with asyncio.timeout(timeout):
                    future = await producer.send_batch(batch.builder, topic, partition=p)
            except Exception as exc:
                failure = exc  # later partitions wait for the next round; submitted ones still count
                break
            future.add_done_callback(_retrieve)
            futures[p] = future
        if futures:
            retirement: asyncio.Future[object] = asyncio.ensure_future(_until(retired))
            pending: set[asyncio.Future[object]] = set(futures.values())
            try:
                while pending and not retired.is_set():
                    _, pending = await asyncio.wait(pending | {retirement}, return_when=asyncio.FIRST_COMPLETED)
                    pending.discard(retirement)
            finally:
                retirement.cancel()

        acked: list[SpoolRow] = []
        for p, future in futures.items():
            if not future.done():
                continue
            error = future.exception() if not future.cancelled() else asyncio.CancelledError()
            if error is None:
                acked.extend(batches[p].rows)
                self._single_row.discard((topic, p))
            elif isinstance(error, RECORD_ERRORS):
                if len(batches[p].rows) == 1:
                    log.error("Kafka refuses a spooled webhook for good (%r): parked in %s", error, self._spool.path)
                    await self._spool.park(batches[p].rows, repr(error))
                else:
                    self._single_row.add((topic, p))  # find the culprit one row at a time
            elif failure is None:
                failure = error
        if acked:
            await self._spool.delete(acked)
            metrics.INGEST_SPOOL_DRAINED.inc(len(acked))
            self._progress()
        if failure is not None:
            raise failure
