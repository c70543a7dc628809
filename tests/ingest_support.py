"""Helpers for the ingest tests: a reader of the raw topic, ingest as a process, its metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import events
from shared.kafka import header_map
from shared.orgs import NewOrg, create_org
from tests.support import ServiceProcess, wait_until


@dataclass(frozen=True)
class RawRecord:
    partition: int
    offset: int
    key: bytes
    value: bytes
    headers: dict[str, str]

    @property
    def delivery_id(self) -> str:
        return self.headers[events.H_DELIVERY_ID]


class RawTopicReader:
    """Reads every partition of a topic from the beginning in the background, no consumer group."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.topic = topic
        self.partitions = list(range(partitions))
        self.records: list[RawRecord] = []
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest", group_id=None
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self._consumer.start()
            tps = [TopicPartition(self.topic, p) for p in self.partitions]
            self._consumer.assign(tps)
            await self._consumer.seek_to_beginning(*tps)
        except BaseException:
            await self._consumer.stop()
            raise
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for r in records:
                    self.records.append(RawRecord(tp.partition, r.offset, r.key, r.value, header_map(r.headers)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    def with_delivery(self, delivery_id: str) -> list[RawRecord]:
        return [r for r in self.records if r.headers.get(events.H_DELIVERY_ID) == delivery_id]

    async def wait_for(self, delivery_ids: set[str], within: float = 30.0) -> dict[str, RawRecord]:
        """The first record of each delivery id, once all of them were read."""

        async def all_seen() -> dict[str, RawRecord] | None:
            first: dict[str, RawRecord] = {}
            for r in self.records:
                d = r.headers.get(events.H_DELIVERY_ID)
                if d in delivery_ids and d not in first:
                    first[d] = r
            return first if len(first) == len(delivery_ids) else None

        return await wait_until(all_seen, within=within, what=f"{len(delivery_ids)} deliveries on {self.topic}")


async def new_org(sessions: async_sessionmaker[AsyncSession], slug: str) -> NewOrg:
    async with sessions() as session, session.begin():
        return await create_org(session, slug)


async def start_ingest(env: Mapping[str, str], log_dir: Path, port: int, client: httpx.AsyncClient) -> ServiceProcess:
    """``blametrail ingest`` as a process, once its /readyz answers 200."""
    process = ServiceProcess("ingest", env, log_dir)

    async def ready() -> bool:
        assert process.alive(), f"ingest exited:\n{process.output()}"
        try:
            return (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    try:
        await wait_until(ready, within=30, what="ingest /readyz")
    except BaseException:
        process.stop()
        print(process.output()[-4000:])
        raise
    return process


async def metric_values(client: httpx.AsyncClient, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ingest's /metrics: (name, sorted labels) → value."""
    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def metric(client: httpx.AsyncClient, port: int, name: str, **labels: str) -> float:
    return (await metric_values(client, port)).get((name, tuple(sorted(labels.items()))), 0.0)
