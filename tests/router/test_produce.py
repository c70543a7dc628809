"""The router's produce step on its own: what happens to sends already made when a later one fails, and
how many outputs one record batch takes."""

from __future__ import annotations

import asyncio
import gc
from typing import Any, cast

from aiokafka.errors import KafkaConnectionError

from incident_writer.consumer import IncidentWriter
from router.consumer import Output, Router, produce
from shared.kafka import partition_for
from shared.producer import Producer
from shared.settings import Settings


class FakeBatch:
    def __init__(self) -> None:
        self.values: list[bytes] = []

    def append(self, *, timestamp: int | None, key: bytes | None, value: bytes, headers: Any) -> object:
        self.values.append(value)
        return object()

    def close(self) -> None:
        pass


class FailingSecondSend:
    """Takes the first batch (its future stays pending), then the broker goes away."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[object]] = []

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1}

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future[object]:
        if self.futures:
            raise KafkaConnectionError("the broker went away")
        self.futures.append(asyncio.get_running_loop().create_future())
        return self.futures[-1]


def key_on(partition: int) -> bytes:
    return next(k for n in range(100) if partition_for(k := f"k{n}".encode(), [0, 1]) == partition)


async def test_a_failed_send_leaves_no_unretrieved_failure_behind() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        producer = FailingSecondSend()
        outputs = [Output("routed", key_on(p), b"v", []) for p in (0, 1)]
        try:
            await produce(cast(Producer, producer), outputs)
        except KafkaConnectionError:
            pass
        else:
            raise AssertionError("the second send's failure was not raised")
        # The first batch fails later too (the batch is retried as a whole; nobody awaits this one).
        producer.futures[0].set_exception(KafkaConnectionError("and this batch failed"))
        await asyncio.sleep(0)
        del producer
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert not [c for c in reported if "never retrieved" in str(c.get("message"))], reported


async def test_a_batch_of_outputs_for_one_partition_fits_one_record_batch() -> None:
    """The idempotent producer has one record batch of a partition in flight at a time: a second one
    waits for the first's acknowledgement. A router batch (``consumer_batch_max`` records of about a
    kilobyte) must not be cut into several round trips a partition."""
    settings = Settings()
    for service in (Router(settings), IncidentWriter(settings)):  # the writer's dead letters too
        producer = service.runtime.producers.current
        builder = producer.create_batch()
        value = b"x" * 1024
        fitted = 0
        while fitted < settings.consumer_batch_max and builder.append(
            timestamp=None, key=b"issue-1", value=value, headers=[("org", b"demo")]
        ):
            fitted += 1
        assert fitted == settings.consumer_batch_max, f"{type(service).__name__}: a record batch took {fitted}"
        await producer.stop()  # never started: this releases what they hold
        await service.runtime.consumer.stop()
