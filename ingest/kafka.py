"""The part of aiokafka ingest relies on: the producer's interface, its partitioner, closing it now.

``Producer`` and ``RecordBatch`` are what ingest calls of ``AIOKafkaProducer`` and its ``BatchBuilder``
(tests pass fakes). ``shared.kafka.partition_for`` is the producer's default partitioner, so the
drainer's batches land where a direct send of the same key would. ``dispose closes a producer without
waiting for its pending records, which aiokafka has no public call for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("blametrail.ingest.producer")


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
