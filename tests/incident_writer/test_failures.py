"""Records the writer cannot write go to the dead-letter topic, with the reason; the rest is written.

Also: the rebalance listener lets the batch in flight finish, or abandons it when it cannot.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from incident_writer.consumer import IncidentWriter
from shared.consumer import DeadLetterLimitExceeded
from shared.db.models import Service
from shared.events import RawRef
from shared.mappings import create_service, delete_service
from shared.settings import Settings
from shared.topics import Topics
from tests.support.writer import (
    BASE_TIME,
    audit_records,
    committed_total,
    dead_letters,
    incidents,
    isolated_settings,
    make_org,
    produce,
    produce_raw,
    routed,
    running_writer,
    wait_for_audit,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("parallel", [1, 4], ids=["one-transaction", "parallel-parts"])
async def test_poison_records_are_dead_lettered_with_the_reason_and_the_rest_is_written(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession], parallel: int
) -> None:
    settings = await isolated_settings(migrated, "poison")
    # parallel-parts: the batch is written as up to four transactions at once, split by issue.
    settings = settings.model_copy(update={"writer_parallel_writes": parallel, "writer_split_min_events": 1})
    org = await make_org(sessions)
    async with sessions() as session, session.begin():
        gone: Service = await create_service(session, org.org_id, "Deleted meanwhile")
    gone_id = gone.id
    async with sessions() as session, session.begin():
        await delete_service(session, org.org_id, gone_id)

    good = [routed(org, issue="1", minute=i) for i in range(6)]
    deleted_service = routed(org, issue="2").model_copy(update={"service_id": gone_id})
    comment_for_deleted_service = routed(org, resource="comment", issue="2").model_copy(update={"service_id": gone_id})
    unknown_org = routed(org, issue="3").model_copy(update={"org": "no-such-org-" + org.slug})
    too_long = routed(org, issue="4").model_copy(update={"project_slug": "p" * 150})
    huge_id = routed(org, issue="5").model_copy(update={"mapping_id": 2**70})
    partition_out_of_range = routed(org, issue="6").model_copy(
        update={"raw": RawRef(topic="sentry.webhooks.raw", partition=2**40, offset=1)}
    )
    nul_in_id = routed(org, issue="7").model_copy(update={"delivery_id": "d\x00" + uuid.uuid4().hex * 2})
    stream = [good[0], deleted_service, good[1], good[2], unknown_org, comment_for_deleted_service]
    stream += [good[3], too_long, huge_id, good[4], partition_out_of_range, nul_in_id, good[5]]
    await produce(settings, stream, partition=0)
    await produce_raw(settings, Topics.from_settings(settings).routed, [b"{not an event"])

    refused = [deleted_service, too_long, huge_id, partition_out_of_range, nul_in_id]
    async with running_writer(settings):
        dead = await dead_letters(settings, 7)
        # Every record of the org ends with an audit record: applied, or failed (with its dead letter).
        records = await wait_for_audit(sessions, org.slug, len(good) + 1 + len(refused))

    applied = [r.delivery_id for r in records if r.outcome == "routed"]
    assert sorted(applied) == sorted(e.delivery_id for e in [*good, comment_for_deleted_service])
    failed = {r.delivery_id: r for r in records if r.outcome == "failed"}
    assert sorted(failed) == sorted(e.delivery_id.replace("\x00", "")[:64] for e in refused)
    assert {r.reason for r in failed.values()} == {"rejected"}
    assert all(r.dlq_offset is not None and r.error for r in failed.values())
    assert failed[deleted_service.delivery_id].error.startswith("ForeignKeyViolation")  # type: ignore[union-attr]
    [incident] = await incidents(sessions, org.org_id)
    assert incident.event_count == len(good)
    assert len(dead) == 7, dead
    by_value = {value: headers for value, headers in dead}
    for event, error in [
        (deleted_service, "ForeignKeyViolation"),
        (unknown_org, "tenant_mismatch"),  # its service is another organization's
        (too_long, "StringDataRightTruncation"),
        (huge_id, "Unwritable"),
        (partition_out_of_range, "NumericValueOutOfRange"),
        (nul_in_id, "UntranslatableCharacter"),
    ]:
        headers = by_value[event.model_dump_json().encode()]
        assert headers["stage"] == "writer.write"
        assert headers["error"].startswith(error), headers["error"]
        assert headers["original_topic"] == Topics.from_settings(settings).routed
        assert headers["original_partition"] == "0"
    undecodable = by_value[b"{not an event"]
    assert undecodable["stage"] == "writer.decode" and undecodable["error"].startswith("invalid event")
    [stranger] = await audit_records(sessions, "no-such-org-" + org.slug)
    assert (stranger.outcome, stranger.org_id, stranger.reason) == ("failed", None, "tenant_mismatch")


async def test_past_the_dead_letter_budget_the_writer_stops_with_nothing_committed(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    settings = await isolated_settings(migrated, "budget")
    settings = settings.model_copy(update={"writer_dlq_window": 10, "writer_dlq_max_ratio": 0.2})
    orgs = [await make_org(sessions) for _ in range(3)]  # a systemic failure: every tenant's records fail
    org = orgs[0]
    bad = [routed(orgs[i % 3], issue=str(i)).model_copy(update={"project_slug": "p" * 150}) for i in range(5)]
    await produce(settings, [routed(org, issue="1"), *bad], partition=0)
    with pytest.raises(DeadLetterLimitExceeded):
        await asyncio.wait_for(IncidentWriter(settings).run(asyncio.Event()), 30)
    assert await committed_total(settings, settings.writer_group) == 0
    assert await dead_letters(settings, 1, within=2) == []


async def test_a_nul_that_reaches_the_writer_is_refused_and_audited_cleaned(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """The router removes NUL (router/boundary.py); a record that still carries one was not made by
    it. It is dead-lettered and audited as failed, with its text cleaned so the record can be read."""
    settings = await isolated_settings(migrated, "nul")
    org = await make_org(sessions)
    event = routed(org, issue="5", title="bad\x00title").model_copy(update={"culprit": "in\x00it"})
    await produce(settings, [event])
    async with running_writer(settings):
        [record] = await wait_for_audit(sessions, org.slug, 1)
    assert (record.outcome, record.title, record.reason) == ("failed", "badtitle", "rejected")
    assert await incidents(sessions, org.org_id) == []


async def test_times_without_a_zone_are_read_as_utc(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    settings = await isolated_settings(migrated, "naive")
    org = await make_org(sessions)
    aware = routed(org, issue="6", minute=0)
    later = BASE_TIME + timedelta(minutes=5)
    naive = routed(org, resource="error", issue="6").model_copy(
        update={"occurred_at": later.replace(tzinfo=None), "received_at": later.replace(tzinfo=None)}
    )
    await produce(settings, [aware, naive], partition=0)
    async with running_writer(settings):
        await wait_for_audit(sessions, org.slug, 2)
    [incident] = await incidents(sessions, org.org_id)
    assert incident.event_count == 2
    assert incident.first_seen_at == aware.occurred_at and incident.last_seen_at == later
