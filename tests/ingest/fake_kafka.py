"""A fake Kafka broker and producer for ingest's rules, and a publisher on a spool wired to them.

The fake answers as told (``FakeBroker.mode``): up (acknowledge), hang (no answer until ``recover``),
fail (``error``); it records what was delivered, per partition, so tests can check order per key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, OutOfOrderSequenceNumber

from ingest.async_spool import AsyncSpool
from ingest.publish import Publisher
from ingest.record import RawRecord
from shared.kafka import partition_for
from shared.producer import Producer, RecordBatch
from tests.support import wait_until

TOPIC = "t.raw"
PARTITIONS = [0, 1, 2]
TIMEOUT = 0.1

Record = tuple[bytes, bytes]  # key, value


class FakeBatch:
    def __init__(self, limit: int = 3) -> None:
        self.records: list[Record] = []
        self.closed = False
        self.limit = limit

    def append(
        self, *, timestamp: int | None, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> object | None:
        if self.closed or len(self.records) >= self.limit:
            return None
        assert key is not None and value is not None
        self.records.append((key, value))
        return object()

    def close(self) -> None:
        self.closed = True


@dataclass
class Pending:
    producer: FakeProducer
    partition: int
    records: list[Record]
    future: asyncio.Future[object]


@dataclass
class FakeBroker:
    """What the fake producers talk to. ``mode``: up (ack), hang (no answer), fail (``error``)."""

    mode: str = "up"
    error: Callable[[], Exception] = lambda: OutOfOrderSequenceNumber()
    refuse_start: bool = False
    hang_batches: bool = False
    reject_value: bytes | None = None
    log: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)
    direct_sends: int = 0
    producers: list[FakeProducer] = field(default_factory=list)

    def submit(
        self, producer: FakeProducer, partition: int, records: list[Record], batch: bool
    ) -> asyncio.Future[object]:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        item = Pending(producer, partition, records, future)
        if self.mode == "up" and not (batch and self.hang_batches):
            self._deliver(item)
        elif self.mode == "fail":
            future.set_exception(self.error())
        else:
            self.pending.append(item)
        return future

    def _deliver(self, item: Pending) -> None:
        if item.future.done():
            return
        if self.reject_value is not None and any(v == self.reject_value for _, v in item.records):
            item.future.set_exception(MessageSizeTooLargeError())
            return
        self.log.extend((item.partition, k, v) for k, v in item.records)
        item.future.set_result(None)

    def recover(self) -> None:
        """Answer again; what was held is delivered in order (the original of a spooled send too)."""
        self.mode = "up"
        self.hang_batches = False
        held, self.pending = self.pending, []
        for item in held:
            self._deliver(item)

    def per_key(self) -> dict[bytes, list[bytes]]:
        """Values of each key in first-delivery order."""
        out: dict[bytes, list[bytes]] = {}
        for _, k, v in self.log:
            if v not in out.setdefault(k, []):
                out[k].append(v)
        return out

    def values(self) -> list[bytes]:
        """Values in first-delivery order (a redelivered duplicate counts once)."""
        seen: list[bytes] = []
        for _, _, v in self.log:
            if v not in seen:
                seen.append(v)
        return seen


class FakeProducer:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.stopped = False
        broker.producers.append(self)

    async def start(self) -> None:
        if self.broker.refuse_start:
            raise KafkaConnectionError("no broker")

    async def stop(self) -> None:
        self.stopped = True

    async def flush(self) -> None:
        mine = [p.future for p in self.broker.pending if p.producer is self and not p.future.done()]
        if mine:
            await asyncio.wait(mine)

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[object]:
        assert key is not None and value is not None
        self.broker.direct_sends += 1
        return self.broker.submit(self, partition_for(key, PARTITIONS), [(key, value)], batch=False)

    def create_batch(self) -> RecordBatch:
        return FakeBatch()

    async def send_batch(self, batch: RecordBatch, topic: str, *, partition: int) -> asyncio.Future[object]:
        assert isinstance(batch, FakeBatch) and batch.closed
        return self.broker.submit(self, partition, batch.records, batch=True)

    async def partitions_for(self, topic: str) -> set[int]:
        return set(PARTITIONS)


def record(n: int, key: str = "org/1") -> RawRecord:
    return RawRecord(key.encode(), f"m{n:04d}".encode(), (("delivery_id", b"d%d" % n),), time.time())


@dataclass
class Harness:
    broker: FakeBroker
    publisher: Publisher
    spool_dir: Path


async def make(
    tmp_path: Path,
    broker: FakeBroker,
    *,
    max_bytes: int = 1 << 20,
    max_inflight: int = 100,
    bootstrap: str = "127.0.0.1:1",  # nothing listens: the watchdog finds the broker unreachable
) -> Harness:
    """A started publisher on a spool in ``tmp_path`` whose producers talk to ``broker``."""
    spool = await AsyncSpool.open(tmp_path, TOPIC, max_bytes)

    def factory() -> Producer:
        return FakeProducer(broker)

    publisher = Publisher(
        spool,
        factory,
        topic=TOPIC,
        publish_timeout=TIMEOUT,
        max_inflight=max_inflight,
        bootstrap=bootstrap,
    )
    await publisher.start(wait_connected=0.5)
    return Harness(broker, publisher, tmp_path)


async def drained(h: Harness) -> None:
    async def empty() -> bool:
        return h.publisher.spool.depth == 0

    await wait_until(empty, within=10, what="empty spool")


async def true(value: bool) -> bool:
    """``value`` as an awaitable probe for ``wait_until``."""
    return value
