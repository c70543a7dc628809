"""Several writers on one stream: never a second incident, every count exact.

Events of one incident are spread over partitions on purpose, so different writers update the same
incident at the same moment (the router keeps one issue on one partition; replays, multi-project
alerts and rebalances do not).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from incident_writer.consumer import IncidentWriter, Item, WriterStep
from incident_writer.store import BatchResult
from shared.settings import Settings
from tests.support import ServiceProcess, free_port, settings_env, wait_until
from tests.support.metrics import scrape
from tests.support.writer import (
    assert_exact,
    committed_total,
    group_members,
    isolated_settings,
    make_org,
    produce,
    running_writer,
    workload,
)

pytestmark = pytest.mark.integration


async def test_two_writers_applying_the_same_events_at_once_count_each_once(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    settings = await isolated_settings(migrated, "twice")
    other = settings.model_copy(update={"writer_group": settings.writer_group + "-other"})
    org = await make_org(sessions, services=2)
    expected = workload(org, events=3000, issues=30, seed=11)
    total = await produce(settings, expected.events, spread_over=settings.topic_partitions)

    async def both_done() -> bool:
        done = [await committed_total(s, s.writer_group) for s in (settings, other)]
        return done == [total, total]

    # Two groups: each writer applies every event, concurrently with the other.
    async with running_writer(settings), running_writer(other):
        await wait_until(both_done, within=60, what="both writers to commit the whole stream")
    await assert_exact(sessions, org, expected)


async def test_a_writer_writing_its_batches_as_parallel_transactions_counts_each_once(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    settings = await isolated_settings(migrated, "parts")
    settings = settings.model_copy(update={"writer_parallel_writes": 4, "writer_split_min_events": 20})
    org = await make_org(sessions, services=2)
    expected = workload(org, events=3000, issues=30, seed=13)
    # Spread over the partitions: an issue's records reach its part from several partitions.
    total = await produce(settings, expected.events, spread_over=settings.topic_partitions)
    at_once = Peak()

    class Counting(IncidentWriter):
        def __init__(self, settings: Settings) -> None:
            super().__init__(settings)
            step = cast(WriterStep, self.runtime.step)
            transaction = step._transaction

            async def counted(items: Sequence[Item]) -> BatchResult:
                with at_once:
                    return await transaction(items)

            step._transaction = counted  # type: ignore[method-assign]

    async def done() -> bool:
        return await committed_total(settings, settings.writer_group) == total

    async with running_writer(settings, Counting):
        await wait_until(done, within=60, what="the writer to commit the whole stream")
    assert at_once.peak >= 2, "no batch was written as parallel transactions"
    await assert_exact(sessions, org, expected)


class Peak:
    """How many ``with`` blocks were open at once, at most."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def __enter__(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def __exit__(self, *_: object) -> None:
        self.now -= 1


async def test_two_writer_processes_in_one_group_open_no_duplicate_incidents(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    settings = await isolated_settings(migrated, "pair")
    org = await make_org(sessions, services=2)
    expected = workload(org, events=6000, issues=40, seed=12)
    half = len(expected.events) // 2
    ports = [free_port(), free_port()]
    envs = [settings_env(settings.model_copy(update={"writer_metrics_port": port})) for port in ports]
    writers = [ServiceProcess("writer", envs[0], tmp_path)]
    try:
        total = await produce(settings, expected.events[:half], spread_over=settings.topic_partitions)

        async def first_committed() -> bool:
            assert writers[0].alive(), writers[0].output()
            return await committed_total(settings, settings.writer_group) > 0

        await wait_until(first_committed, within=30, what="the first writer to commit")
        writers.append(ServiceProcess("writer", envs[1], tmp_path))  # joins mid-stream: a rebalance

        async def two_members() -> bool:
            return await group_members(settings, settings.writer_group) == ("Stable", 2)

        await wait_until(two_members, within=30, what="both writers in the group")
        total += await produce(settings, expected.events[half:], spread_over=settings.topic_partitions)

        async def done() -> bool:
            for writer in writers:
                assert writer.alive(), writer.output()
            return await committed_total(settings, settings.writer_group) == total

        await wait_until(done, within=60, what="the group to commit the whole stream")
        written = [await scrape(port, "blametrail_writer_events_total", outcome="written") for port in ports]
        assert all(n > 0 for n in written), written
    finally:
        codes = [writer.stop() for writer in writers]
    assert codes == [0, 0], "\n".join(w.output()[-3000:] for w in writers)
    await assert_exact(sessions, org, expected)
