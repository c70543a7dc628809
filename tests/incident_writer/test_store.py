"""``store.write_batch`` in interleavings two writers can produce, driven step by step on real Postgres."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from incident_writer.store import ConcurrentIncident, write_batch
from tests.support import wait_until
from tests.support.writer import audit_count, incidents, make_org, routed, timeline

pytestmark = pytest.mark.integration


async def _waiting_on_a_lock(sessions: async_sessionmaker[AsyncSession], statement: str) -> bool:
    async with sessions() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND state = 'active' AND query LIKE :statement"
            ),
            {"statement": f"{statement}%"},
        )
    return bool(waiting)


async def test_an_incident_opened_by_another_writer_meanwhile_is_retried_not_duplicated(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    org = await make_org(sessions)
    first, second = routed(org, issue="1", minute=0), routed(org, issue="1", minute=1)

    async with sessions() as a:
        await a.begin()
        opened = await write_batch(a, [first])  # opens the incident, not committed yet
        assert opened.changes == {"opened": 1}

        async def other_writer() -> None:
            async with sessions() as b, b.begin():
                await write_batch(b, [second])

        racing = asyncio.create_task(other_writer())
        # B did not see A's incident and waits on A's uncommitted row of the same (service, key)
        await wait_until(lambda: _waiting_on_a_lock(sessions, "INSERT INTO incidents"), what="B waiting on A")
        await a.commit()
    with pytest.raises(ConcurrentIncident):
        await racing

    async with sessions() as b, b.begin():  # the writer's retry
        retried = await write_batch(b, [second])
    assert retried.changes == {"updated": 1}
    [incident] = await incidents(sessions, org.org_id)
    assert incident.event_count == 2
    assert [e.change for e in await timeline(sessions, incident.id)] == ["opened", "updated"]


async def test_a_writer_updating_an_incident_waits_for_the_other_and_sees_its_update(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    org = await make_org(sessions)
    async with sessions() as session, session.begin():
        await write_batch(session, [routed(org, issue="2")])

    async with sessions() as a:
        await a.begin()
        await write_batch(a, [routed(org, issue="2", minute=1), routed(org, action="resolved", issue="2")])

        async def other_writer() -> dict[str, int]:
            async with sessions() as b, b.begin():
                return dict((await write_batch(b, [routed(org, resource="error", issue="2", minute=2)])).changes)

        racing = asyncio.create_task(other_writer())
        await wait_until(lambda: _waiting_on_a_lock(sessions, "SELECT incidents.id"), what="B waiting on A's lock")
        await a.commit()
    # B read the incident after A's commit: resolved, two occurrences; its occurrence reopens it
    assert await racing == {"reopened": 1}
    [incident] = await incidents(sessions, org.org_id)
    assert (incident.event_count, incident.status) == (3, "open")


async def test_the_same_batch_twice_at_once_writes_once(sessions: async_sessionmaker[AsyncSession]) -> None:
    org = await make_org(sessions)
    batch = [routed(org, issue=str(i % 5), minute=i) for i in range(40)]

    async def write() -> int:
        async with sessions() as session, session.begin():
            return (await write_batch(session, batch)).written

    assert sorted(await asyncio.gather(write(), write())) == [0, 40]
    assert await audit_count(sessions, org.slug) == 40
    assert sorted(i.event_count for i in await incidents(sessions, org.org_id)) == [8] * 5
