"""Reading topics in tests: every partition from the beginning, in the background, no consumer group."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from shared import events
from shared.kafka import header_map
from tests.support import wait_until


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, str]

    @property
    def delivery_id(self) -> str:
        return self.headers[events.H_DELIVERY_ID]

    def json(self) -> Any:
        return orjson.loads(self.value)


class TopicReader:
    """Collects every record of ``topics`` into ``records`` while open (``async with``)."""

    def __init__(self, bootstrap: str, topics: Iterable[str]) -> None:
        self.topics = list(topics)
        self.records: list[Record] = []
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TopicReader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        try:
            await self._consumer.start()
            parts = await wait_until(self._partitions, within=30, what=f"metadata of {self.topics}")
            self._consumer.assign(parts)
            await self._consumer.seek_to_beginning(*parts)
        except BaseException:
            await self._consumer.stop()
            raise
        self._task = asyncio.create_task(self._run())

    async def _partitions(self) -> list[TopicPartition] | None:
        await self._consumer._client.force_metadata_update()
        known = [(t, self._consumer.partitions_for_topic(t)) for t in self.topics]
        if any(not parts for _, parts in known):
            return None
        return [TopicPartition(t, p) for t, parts in known for p in sorted(parts or ())]

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for r in records:
                    self.records.append(
                        Record(tp.topic, tp.partition, r.offset, r.key, r.value or b"", header_map(r.headers))
                    )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    def on(self, topic: str) -> list[Record]:
        return [r for r in self.records if r.topic == topic]

    def events(self, topic: str) -> list[Any]:
        """The JSON values of ``topic``'s records."""
        return [r.json() for r in self.on(topic)]

    def with_delivery(self, delivery_id: str) -> list[Record]:
        return [r for r in self.records if r.headers.get(events.H_DELIVERY_ID) == delivery_id]

    async def wait_for_count(self, count: int, topics: Collection[str] | None = None, within: float = 30.0) -> None:
        """Until at least ``count`` records of ``topics`` (default: all read topics) were read."""
        wanted = set(topics or self.topics)

        async def enough() -> bool:
            return sum(1 for r in self.records if r.topic in wanted) >= count

        await wait_until(enough, within=within, what=f"{count} records on {sorted(wanted)}")

    async def wait_for(self, delivery_ids: set[str], within: float = 30.0) -> dict[str, Record]:
        """The first record of each delivery id, once all of them were read."""

        async def all_seen() -> dict[str, Record] | None:
            first: dict[str, Record] = {}
            for r in self.records:
                d = r.headers.get(events.H_DELIVERY_ID)
                if d in delivery_ids and d not in first:
                    first[d] = r
            return first if len(first) == len(delivery_ids) else None

        return await wait_until(all_seen, within=within, what=f"{len(delivery_ids)} deliveries on {self.topics}")
