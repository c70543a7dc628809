"""The window a replay reads: one topic from a time to a time, with a consumer of its own.

The consumer has no group (``assign`` + ``seek``), so it never touches the running groups' offsets
and is safe while the pipeline runs. Each partition starts at its first record at or after
``--from`` (``offsets_for_times``) and stops at its first record past ``--to`` or at its end as
read when the replay started, so records the replay itself republishes are not read again.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from replay import ReplayError
from shared.events import rfc3339
from shared.kafka import make_consumer
from shared.settings import Settings

_AGO = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: datetime) -> datetime:
    """RFC 3339 (UTC when no zone is given) or an age before ``now`` (``90m``, ``24h``, ``7d``)."""
    ago = _AGO.fullmatch(text.strip())
    if ago:
        return now - timedelta(seconds=int(ago[1]) * _UNIT_SECONDS[ago[2]])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReplayError(
            f"bad time {text!r}: give RFC 3339 (2026-11-01T12:00:00Z) or an age such as 90m, 24h or 7d"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def group_less_consumer(settings: Settings, client_id: str = "blametrail-replay") -> AIOKafkaConsumer:
    """A consumer that joins no group and commits nothing: it only reads what it is assigned.

    ``make_consumer`` passes ``group_id`` to aiokafka as is, and aiokafka takes None for "no group";
    the ignore goes (mypy reports it unused) once ``make_consumer`` declares ``str | None``."""
    return make_consumer(settings, group_id=None, client_id=client_id)


async def partitions_of(consumer: AIOKafkaConsumer, topics: Iterable[str]) -> list[TopicPartition]:
    """Every partition of ``topics`` (fresh metadata); a missing topic is a :class:`ReplayError`."""
    # consumer.topics() names the topics but leaves partitions_for_topic() unaware of them (aiokafka
    # 0.14): read the partitions from the same fresh metadata instead.
    cluster = await consumer._client.fetch_all_metadata()
    found = []
    for topic in topics:
        partitions = cluster.partitions_for_topic(topic)
        if not partitions:
            raise ReplayError(f"topic {topic} does not exist (BLAMETRAIL_TOPIC_PREFIX?)")
        found += [TopicPartition(topic, p) for p in sorted(partitions)]
    return found


async def offsets_at(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], ms: int, ends: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """Kafka's ``--to-datetime``: each partition's first offset with a timestamp at or after ``ms``,
    or its end offset (``ends``) when it has none."""
    found = await consumer.offsets_for_times(dict.fromkeys(partitions, ms))
    return {tp: found[tp].offset if found.get(tp) is not None else ends[tp] for tp in partitions}


@dataclass(frozen=True)
class PartitionRange:
    first: int  # the first record at or after --from
    stop: int  # the partition's end when the replay started (exclusive)
    estimated_stop: int  # the first record past --to by the broker's time index (for progress only)


class WindowReader:
    """``async with WindowReader(...) as reader: async for record in reader.records(stop)``."""

    def __init__(self, settings: Settings, topic: str, start: datetime, end: datetime) -> None:
        self.topic = topic
        self.start, self.end = start, end
        self.ranges: dict[TopicPartition, PartitionRange] = {}
        self._consumer = group_less_consumer(settings)

    async def __aenter__(self) -> WindowReader:
        await self._consumer.start()
        try:
            await self._plan()
        except BaseException:
            await self._consumer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    @property
    def estimate(self) -> int:
        """Records in the window, about (the broker's time index; exact when timestamps only grow)."""
        return sum(r.estimated_stop - r.first for r in self.ranges.values())

    async def _plan(self) -> None:
        partitions = await partitions_of(self._consumer, [self.topic])
        ends = await self._consumer.end_offsets(partitions)
        firsts = await offsets_at(self._consumer, partitions, epoch_ms(self.start), ends)
        lasts = await offsets_at(self._consumer, partitions, epoch_ms(self.end) + 1, ends)
        self.ranges = {
            tp: PartitionRange(firsts[tp], ends[tp], lasts[tp]) for tp in partitions if firsts[tp] < lasts[tp]
        }
        if not self.ranges:
            raise ReplayError(f"no records in {self.topic} between {rfc3339(self.start)} and {rfc3339(self.end)}")

    async def records(self, stop: asyncio.Event) -> AsyncGenerator[ConsumerRecord, None]:
        """The window's records, each partition in order, until the window ends or ``stop`` is set."""
        consumer, end_ms = self._consumer, epoch_ms(self.end)
        active = set(self.ranges)
        consumer.assign(list(active))
        for tp, span in self.ranges.items():
            consumer.seek(tp, span.first)
        while active and not stop.is_set():
            batches = await consumer.getmany(*active, timeout_ms=500, max_records=500)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= self.ranges[tp].stop or record.timestamp > end_ms:
                        active.discard(tp)
                        consumer.pause(tp)
                        break
                    yield record
                    if stop.is_set():
                        return
            for tp in list(active):
                if await consumer.position(tp) >= self.ranges[tp].stop:
                    active.discard(tp)
                    consumer.pause(tp)
