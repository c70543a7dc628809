"""Draining the spool: spooled records reach the raw topic oldest first, per partition in spool order.

``Drainer`` runs in the background while ingest runs. Each round peeks the oldest rows, builds at most
one record batch per partition (the partition the producer's own partitioner picks: murmur2 of the
key), sends them and waits until every batch of the round is resolved (acknowledged or failed as a
whole) before it deletes the acknowledged rows and starts the next round. So a key's records reach
the topic in spool order, and a row is deleted only after the broker acknowledged it; a crash in
between sends those rows again (duplicates with the same ``delivery_id``, which consumers ignore).

A failed round is retried with a backoff of 0.1-2 s; a fatal producer error makes the supervisor
replace the producer, and a round whose producer is retired stops waiting (its rows are sent again by
the successor). A record Kafka refuses for good (``RECORD_ERRORS``, e.g. larger than the topic's
``max.message.bytes``) is isolated one row at a time and parked in the spool file: it never blocks
the queue and is never dropped. Every ``ORPHAN_SCAN_SECONDS`` the spool adopts the files of dead
workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from aiokafka.errors import (
    CorruptRecordException,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    UnsupportedForMessageFormatError,
)

from ingest.async_spool import AsyncSpool
from ingest.producer import ProducerSupervisor, sleep_unless
from ingest.spool import SpoolRow
from ingest.spool_files import SpoolError
from shared import metrics
from shared.kafka import partition_for
from shared.producer import Producer, RecordBatch, retrieve

log = logging.getLogger("blametrail.ingest.drain")

SEND_TIMEOUT = 5.0
ORPHAN_SCAN_SECONDS = 60.0
DRAIN_ROWS = 500
DRAIN_BYTES = 4 * 1024 * 1024

# The record itself is refused for good: retrying cannot help.
RECORD_ERRORS: tuple[type[BaseException], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    CorruptRecordException,
    UnsupportedForMessageFormatError,
)


async def _until(event: asyncio.Event) -> object:
    return await event.wait()


@dataclass
class _Batch:
    builder: RecordBatch
    rows: list[SpoolRow] = field(default_factory=list)


class Drainer:
    """Delivers ``spool``'s rows to ``topic`` through the supervised producer; see the module docstring."""

    def __init__(self, spool: AsyncSpool, producers: ProducerSupervisor, topic: str) -> None:
        self._spool = spool
        self._producers = producers
        self._topic = topic
        self._single_row: set[int] = set()  # partitions whose rows go one at a time (finding a refused one)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """Rows were spooled or a producer connected: drain now rather than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._drain(), name="ingest-drainer")

    async def stop(self, grace: float) -> bool:
        """Finish the current round within ``grace`` seconds, else stop waiting for Kafka's answers
        (the round's rows stay spooled). Returns whether Kafka answered in time."""
        self._stop.set()
        self._wake.set()
        task = self._task
        if task is None:
            return True
        answered = True
        done, _ = await asyncio.wait([task], timeout=grace)
        if not done:
            answered = False
            self._producers.retired.set()  # stop waiting for the round's acknowledgements
            done, _ = await asyncio.wait([task], timeout=1.0)
            if not done:
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return answered

    async def _drain(self) -> None:
        backoff = 0.1
        next_scan = time.monotonic() + ORPHAN_SCAN_SECONDS
        while not self._stop.is_set():
            if time.monotonic() >= next_scan:
                next_scan = time.monotonic() + ORPHAN_SCAN_SECONDS
                with contextlib.suppress(SpoolError):
                    await self._spool.adopt_orphans()
            producer = self._producers.producer
            if not self._spool.depth or producer is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            try:
                await self._round(producer, self._producers.retired)
            except Exception as exc:
                self._producers.check_error(producer, exc)
                log.debug("drain round failed (%r); retrying in %.1fs", exc, backoff)
                if await sleep_unless(self._stop, backoff):
                    return
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1

    async def _round(self, producer: Producer, retired: asyncio.Event) -> None:
        """Send the oldest rows: one batch per partition, delete what was acknowledged.

        Waits until every batch of the round is resolved (or ``producer`` is retired: the rest of the
        round is then sent again by its successor), then raises the first failure, if any.
        """
        rows = await self._spool.peek(DRAIN_ROWS, DRAIN_BYTES)
        if not rows:
            return
        async with asyncio.timeout(SEND_TIMEOUT):
            partitions = sorted(await producer.partitions_for(self._topic))
        batches = self._build(producer, rows, partitions)

        futures: dict[int, asyncio.Future[object]] = {}
        failure: BaseException | None = None
        for p, batch in batches.items():
            batch.builder.close()
            try:
                async with asyncio.timeout(SEND_TIMEOUT):
                    future = await producer.send_batch(batch.builder, self._topic, partition=p)
            except Exception as exc:
                failure = exc  # later partitions wait for the next round; submitted ones still count
                break
            future.add_done_callback(retrieve)
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
                self._single_row.discard(p)
            elif isinstance(error, RECORD_ERRORS):
                if len(batches[p].rows) == 1:
                    log.error("Kafka refuses a spooled webhook for good (%r): parked in %s", error, self._spool.path)
                    await self._spool.park(batches[p].rows, repr(error))
                else:
                    self._single_row.add(p)  # find the culprit one row at a time
            elif failure is None:
                failure = error
        if acked:
            await self._spool.delete(acked)
            metrics.INGEST_SPOOL_DRAINED.inc(len(acked))
            self._producers.progress()
        if failure is not None:
            raise failure

    def _build(self, producer: Producer, rows: list[SpoolRow], partitions: list[int]) -> dict[int, _Batch]:
        """One batch per partition of the rows in spool order; a partition's rows stop at the first
        that does not fit (or after one row while isolating a refused record)."""
        batches: dict[int, _Batch] = {}
        closed: set[int] = set()
        for row in rows:
            r = row.record
            p = partition_for(r.key, partitions)
            if p in closed:
                continue
            batch = batches.get(p)
            if batch is None:
                batch = batches[p] = _Batch(producer.create_batch())
            elif p in self._single_row:
                closed.add(p)
                continue
            if (
                batch.builder.append(timestamp=r.timestamp_ms, key=r.key, value=r.value, headers=list(r.headers))
                is None
            ):
                closed.add(p)  # full: this partition's later rows wait for the next round
                continue
            batch.rows.append(row)
        return batches
