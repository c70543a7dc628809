"""Process plumbing for the consumer services: logging, signals, the metrics endpoint, lag."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from prometheus_client import start_http_server

from shared import metrics


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


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


class RebalanceMetrics(ConsumerRebalanceListener):  # type: ignore[misc]
    """Counts rebalances; the batch loops commit before every poll, so nothing is pending at revoke."""

    def __init__(self, group: str) -> None:
        self._group = group

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        metrics.CONSUMER_REBALANCES.labels(group=self._group, kind="revoked").inc()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        metrics.CONSUMER_REBALANCES.labels(group=self._group, kind="assigned").inc()


def record_lag(consumer: AIOKafkaConsumer, group: str, positions: dict[TopicPartition, int]) -> None:
    for tp, next_offset in positions.items():
        end = consumer.highwater(tp)
        if end is not None:
            metrics.CONSUMER_LAG.labels(group=group, topic=tp.topic, partition=str(tp.partition)).set(
                max(0, end - next_offset)
            )
