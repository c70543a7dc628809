"""One tenant's bad records never stop the others, and never reach another tenant's services."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.events import OutputEvent
from shared.settings import Settings
from tests.support import wait_until
from tests.support.writer import (
    audit_records,
    incidents,
    isolated_settings,
    make_org,
    produce,
    routed,
    running_writer,
)

pytestmark = pytest.mark.integration


async def test_a_forged_routed_record_naming_another_orgs_service_is_refused(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    settings = await isolated_settings(migrated, "seal")
    victim, attacker = await make_org(sessions), await make_org(sessions)
    forged = routed(attacker, issue="1").model_copy(
        update={"service_id": victim.services[0], "mapping_id": victim.mappings[0]}
    )
    await produce(settings, [forged], partition=0)
    async with running_writer(settings):
        [record] = await wait_until(lambda: audit_records(sessions, attacker.slug), within=30, what="audit")
    assert (record.outcome, record.reason, record.service_id) == ("failed", "tenant_mismatch", None)
    assert record.dlq_offset is not None
    assert await incidents(sessions, victim.org_id) == [] and await incidents(sessions, attacker.org_id) == []


async def test_a_thousand_bad_records_of_one_org_never_stop_the_writer_for_another(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    settings = await isolated_settings(migrated, "tenants")  # the default budget: 10% of 1,000, 3 orgs
    careless, careful = await make_org(sessions), await make_org(sessions)
    stream: list[OutputEvent] = []
    for n in range(1000):
        if n % 20 == 0:  # a value no column holds: found by bisecting the batch
            bad = routed(careless, issue=f"a{n}").model_copy(update={"project_slug": "p" * 150})
        else:  # another organization's service: refused before writing
            bad = routed(careless, issue=f"a{n}").model_copy(update={"service_id": careful.services[1]})
        stream.append(bad)
        if n % 5 == 0:
            stream.append(routed(careful, issue=f"b{n}", minute=n % 60))
    await produce(settings, stream, spread_over=settings.topic_partitions)

    async with running_writer(settings) as writer:

        async def all_audited() -> bool:
            return len(await audit_records(sessions, careless.slug)) == 1000

        await wait_until(all_audited, within=120, what="every bad record audited as failed")

        async def every_incident() -> list[object] | None:
            found = await incidents(sessions, careful.org_id)
            return list(found) if len(found) == 200 else None

        await wait_until(every_incident, within=60, what="the careful org's 200 incidents")
        assert writer.consumer.assignment()  # still running (running_writer checks it did not stop)
    assert {i.service_id for i in await incidents(sessions, careful.org_id)} == {careful.services[0]}
    records = await audit_records(sessions, careless.slug)
    assert {(r.outcome, r.reason) for r in records} == {("failed", "tenant_mismatch"), ("failed", "rejected")}
    assert await incidents(sessions, careless.org_id) == []
