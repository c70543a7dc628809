"""Process plumbing for the consumer services: logging, signals, the metrics endpoint, lag."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from prometheus_client import start_http_server

from shared import metrics

log = logging.getLogger(__name__)


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` (0 disables it)."""
    if port:
        start_http_server(port, addr=host)


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` where ``stop`` is set on SIGTERM or SIGINT, so the service can finish cleanly."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


class RebalanceGuard(ConsumerRebalanceListener):  # type: ignore[misc]
    """Lets the in-flight batch finish and commit before partitions are revoked; counts rebalances.

    A consumer runs each batch inside ``async with guard.batch():``. aiokafka calls
    ``on_partitions_revoked`` from its coordinator task, possibly mid-batch; the guard waits for
    the batch (whose last step commits its offsets) for at most ``drain_seconds``. A batch still
    running then is abandoned: its commit fails, nothing of it is committed, and the partitions'
    next owner gets its records again (idempotent downstream writes absorb the repeat).
    """

    def __init__(self, group: str, drain_seconds: float = 20.0) -> None:
        self._group = group
        self._drain_seconds = drain_seconds
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        async with self._lock:
            yield

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        metrics.CONSUMER_REBALANCES.labels(group=self._group, kind="revoked").inc()
        try:
            await asyncio.wait_for(self._lock.acquire(), self._drain_seconds)
        except TimeoutError:
            log.warning("batch still running after %.0fs at rebalance: abandoning it", self._drain_seconds)
            return
        self._lock.release()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        metrics.CONSUMER_REBALANCES.labels(group=self._group, kind="assigned").inc()
        metrics.CONSUMER_ASSIGNED_PARTITIONS.labels(group=self._group).set(len(assigned))


class DeadLetterLimitExceeded(RuntimeError):
    """Too many records dead-lettered recently: stop instead of dead-lettering a whole topic."""


class DeadLetterBudget:
    """Allows at most ``max_ratio`` of the last ``window`` records to be dead-lettered.

    Beyond it ``record(dead=True)`` raises :class:`DeadLetterLimitExceeded`: after a bad deploy the
    consumer stops loudly (nothing of the batch is committed) rather than emptying a topic into the DLQ.
    """

    def __init__(self, max_ratio: float, window: int) -> None:
        self._limit = max(1, int(max_ratio * window))
        self._recent: collections.deque[bool] = collections.deque(maxlen=window)
        self._dead = 0

    def record(self, dead: bool) -> None:
        if len(self._recent) == self._recent.maxlen and self._recent[0]:
            self._dead -= 1
        self._recent.append(dead)
        self._dead += dead
        if self._dead > self._limit:
            raise DeadLetterLimitExceeded(
                f"{self._dead} of the last {len(self._recent)} records were dead-lettered "
                f"(limit {self._limit}): stopping; fix the cause, then restart"
            )


def record_lag(consumer: AIOKafkaConsumer, group: str, positions: dict[TopicPartition, int]) -> None:
    for tp, next_offset in positions.items():
        end = consumer.highwater(tp)
        if end is not None:
            metrics.CONSUMER_LAG.labels(group=group, topic=tp.topic, partition=str(tp.partition)).set(
                max(0, end - next_offset)
            )
