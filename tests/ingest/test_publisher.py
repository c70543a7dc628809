"""The publisher's decisions against a fake broker: ack, spool, drain in order, restart, limits.

The real broker is in test_ingest_outage.py; these pin down each rule quickly and deterministically.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, OutOfOrderSequenceNumber

from ingest import publisher as publisher_module
from ingest.publisher import Outcome, Producer, Publisher, RecordBatch, Unavailable, partition_for
from ingest.spool import AsyncSpool, SpooledMessage, spooled_rows
from tests.support import wait_until
from tests.support.metrics import local as counter

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


class _Accumulator:
    def __init__(self, producer: FakeProducer) -> None:
        self._producer = producer

    def fail_all(self, exc: Exception) -> None:
        for item in self._producer.broker.pending:
            if item.producer is self._producer and not item.future.done():
                item.future.set_exception(exc)


class FakeProducer:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.stopped = False
        self._message_accumulator = _Accumulator(self)
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


def message(n: int, key: str = "org/1") -> SpooledMessage:
    return SpooledMessage(TOPIC, key.encode(), f"m{n:04d}".encode(), (("delivery_id", b"d%d" % n),), time.time())


@dataclass
class Harness:
    broker: FakeBroker
    publisher: Publisher
    spool_dir: Path


async def make(tmp_path: Path, broker: FakeBroker, *, max_bytes: int = 1 << 20, max_inflight: int = 100) -> Harness:
    spool = await AsyncSpool.open(tmp_path, max_bytes)

    def factory() -> Producer:
        return FakeProducer(broker)

    publisher = Publisher(
        spool,
        factory,
        topic=TOPIC,
        publish_timeout=TIMEOUT,
        max_inflight=max_inflight,
        bootstrap="127.0.0.1:1",  # nothing listens: the watchdog finds the broker unreachable
    )
    await publisher.start(wait_connected=0.5)
    return Harness(broker, publisher, tmp_path)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await make(tmp_path, FakeBroker())
    yield h
    await h.publisher.close()


async def drained(h: Harness) -> None:
    async def empty() -> bool:
        return h.publisher.spool.total_depth == 0

    await wait_until(empty, within=10, what="empty spool")


async def test_acknowledged_publish_is_accepted_directly(harness: Harness) -> None:
    assert await harness.publisher.publish(message(1)) is Outcome.ACCEPTED
    assert harness.broker.values() == [b"m0001"]
    assert harness.publisher.spool.total_depth == 0


async def test_no_ack_in_time_spools_later_ones_follow_and_drain_in_order(harness: Harness) -> None:
    broker = harness.broker
    drained_before = counter("blametrail_ingest_spool_drained_total")
    broker.mode = "hang"
    started = time.monotonic()
    sent = [message(1)]
    assert await harness.publisher.publish(sent[0]) is Outcome.SPOOLED
    assert time.monotonic() - started >= TIMEOUT
    for n in range(2, 14):  # other keys too: while the topic has rows, nothing goes around the spool
        sent.append(message(n, key=f"org/{n % 3}"))
        assert await harness.publisher.publish(sent[-1]) is Outcome.SPOOLED
    assert broker.direct_sends == 1
    assert harness.publisher.spool.depth(TOPIC) == 13

    broker.recover()
    await drained(harness)
    expected: dict[bytes, list[bytes]] = {}
    for m in sent:
        expected.setdefault(m.key, []).append(m.value)
    assert broker.per_key() == expected
    assert counter("blametrail_ingest_spool_drained_total") - drained_before == 13
    # one key, one partition, whichever path it took
    by_key = {k: {p for p, k2, _ in broker.log if k2 == k} for _, k, _ in broker.log}
    assert all(len(parts) == 1 for parts in by_key.values())

    assert await harness.publisher.publish(message(8)) is Outcome.ACCEPTED
    assert broker.direct_sends == 2


async def test_a_fatal_producer_error_recreates_the_producer(harness: Harness) -> None:
    broker = harness.broker
    restarts = counter("blametrail_ingest_producer_restarts_total")
    broker.mode = "fail"  # aiokafka issue 1017: every send fails after a broker restart
    assert await harness.publisher.publish(message(1)) is Outcome.SPOOLED
    await wait_until(lambda: _async(len(broker.producers) >= 2), within=5, what="a second producer")
    assert counter("blametrail_ingest_producer_restarts_total") - restarts >= 1
    assert broker.producers[0].stopped
    broker.mode = "up"
    await drained(harness)
    assert broker.values() == [b"m0001"]
    assert all(p.producer is not broker.producers[0] for p in broker.pending)


async def test_past_the_inflight_limit_webhooks_are_spooled_at_once(tmp_path: Path) -> None:
    h = await make(tmp_path, FakeBroker(mode="hang"), max_inflight=1)
    try:
        first = asyncio.create_task(h.publisher.publish(message(1)))
        await wait_until(lambda: _async(h.broker.direct_sends == 1), within=5, what="first send")
        started = time.monotonic()
        assert await h.publisher.publish(message(2, key="org/2")) is Outcome.SPOOLED
        assert time.monotonic() - started < TIMEOUT
        assert await first is Outcome.SPOOLED
        h.broker.recover()
        await drained(h)
        assert h.broker.values() == [b"m0001", b"m0002"]
    finally:
        await h.publisher.close()


async def test_full_spool_tries_kafka_once_more_then_answers_unavailable(tmp_path: Path) -> None:
    size = message(1).size
    h = await make(tmp_path, FakeBroker(mode="hang"), max_bytes=2 * size)
    try:
        assert await h.publisher.publish(message(1)) is Outcome.SPOOLED
        assert await h.publisher.publish(message(2)) is Outcome.SPOOLED
        with pytest.raises(Unavailable):
            await h.publisher.publish(message(3))  # full, and Kafka does not answer either
        h.broker.mode = "up"
        h.broker.hang_batches = True  # Kafka is back, the drainer is not through yet
        assert await h.publisher.publish(message(4)) is Outcome.ACCEPTED  # durability over order
        h.broker.recover()
        await drained(h)
        # m0003 was answered 503, yet its timed-out send may still land: a 503 promises nothing either way
        assert {b"m0001", b"m0002", b"m0004"} <= set(h.broker.values())
    finally:
        await h.publisher.close()


async def test_without_kafka_at_start_webhooks_are_spooled_then_delivered(tmp_path: Path) -> None:
    h = await make(tmp_path, FakeBroker(refuse_start=True))
    try:
        assert not h.publisher.producer_connected and h.publisher.spool_writable
        assert await h.publisher.publish(message(1)) is Outcome.SPOOLED
        h.broker.refuse_start = False
        await drained(h)
        assert h.publisher.producer_connected
        assert h.broker.values() == [b"m0001"]
    finally:
        await h.publisher.close()


async def test_a_record_kafka_refuses_for_good_is_parked_not_blocking(harness: Harness) -> None:
    broker = harness.broker
    broker.mode = "hang"
    for n in range(1, 5):
        assert await harness.publisher.publish(message(n)) is Outcome.SPOOLED
    broker.reject_value = b"m0002"
    broker.recover()
    await drained(harness)
    assert broker.values() == [b"m0001", b"m0003", b"m0004"]
    assert harness.publisher.spool.total_depth == 0  # m0002 is parked in the spool file, not lost


async def test_close_keeps_unsent_rows_in_the_spool(tmp_path: Path) -> None:
    h = await make(tmp_path, FakeBroker(mode="hang"))
    for n in range(3):
        assert await h.publisher.publish(message(n)) is Outcome.SPOOLED
    started = time.monotonic()
    await h.publisher.close()
    assert time.monotonic() - started < 8
    assert spooled_rows(tmp_path) == 3


async def test_a_producer_without_progress_while_kafka_is_reachable_is_recreated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publisher_module, "STUCK_AFTER", 0.5)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    broker = FakeBroker()
    spool = await AsyncSpool.open(tmp_path, 1 << 20)
    publisher = Publisher(
        spool,
        lambda: FakeProducer(broker),
        topic=TOPIC,
        publish_timeout=TIMEOUT,
        max_inflight=10,
        bootstrap=f"127.0.0.1:{port}",
    )
    try:
        await publisher.start()
        broker.mode = "hang"  # connections accepted, nothing acknowledged: a stuck producer
        assert await publisher.publish(message(1)) is Outcome.SPOOLED
        await wait_until(lambda: _async(len(broker.producers) >= 2), within=10, what="a recreated producer")
        broker.recover()
        await wait_until(lambda: _async(publisher.spool.total_depth == 0), within=10, what="empty spool")
    finally:
        await publisher.close()
        server.close()
        await server.wait_closed()


async def _async(value: bool) -> bool:
    return value
