"""Reprocessing through the real writer (events produced to Kafka, results read from Postgres).

The worked examples of docs/replay.md at the writer: an ignored delivery that routes now takes
effect once; a routed one never moves; events apply by their original time.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.models import AuditRecord
from shared.events import IgnoredEvent, OutputEvent, Reason, RoutedEvent
from shared.settings import Settings
from tests.support import wait_until
from tests.support.writer import (
    BASE_TIME,
    Org,
    audit_records,
    incidents,
    make_org,
    produce,
    routed,
    timeline,
    wait_for_audit,
)

pytestmark = pytest.mark.integration


def was_ignored(event: RoutedEvent, reason: Reason = Reason.UNMAPPED) -> IgnoredEvent:
    """What the router decided for ``event``'s delivery before its project was mapped."""
    fields = event.model_dump(exclude={"outcome", "service_id", "mapping_id", "replay_id"})
    return IgnoredEvent(**fields, reason=reason)


async def record_of(sessions: async_sessionmaker[AsyncSession], org: Org, delivery: str) -> AuditRecord:
    [record] = [r for r in await audit_records(sessions, org.slug) if r.delivery_id == delivery]
    return record


async def routed_by_replay(
    sessions: async_sessionmaker[AsyncSession], org: Org, delivery: str, replay_id: str
) -> AuditRecord | None:
    record = await record_of(sessions, org, delivery)
    return record if record.replay_id == replay_id else None


async def test_an_ignored_delivery_routed_by_a_replay_takes_effect_once(
    stream: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    org = await make_org(sessions)
    first = routed(org, issue="31", minute=0, title="Payment failed")
    later = routed(org, issue="31", minute=7)
    await produce(stream, [was_ignored(first), was_ignored(later)], partition=0)
    await wait_for_audit(sessions, org.slug, 2)
    assert await incidents(sessions, org.org_id) == []

    # The project is mapped now; the replay reprocesses both deliveries.
    replay = [e.model_copy(update={"replay_id": "r1"}) for e in (first, later)]
    await produce(stream, replay)
    await wait_until(lambda: routed_by_replay(sessions, org, later.delivery_id, "r1"), within=30, what="upgrade")

    [incident] = await incidents(sessions, org.org_id)
    assert (incident.event_count, incident.title, incident.service_id) == (2, "Payment failed", org.services[0])
    assert incident.first_seen_at == first.occurred_at  # its original time, not the replay's
    for event in (first, later):
        record = await record_of(sessions, org, event.delivery_id)
        assert (record.outcome, record.reason, record.incident_id) == ("routed", None, incident.id)
        assert (record.previous_outcome, record.previous_reason, record.replay_id) == ("ignored", "unmapped", "r1")

    # A second identical replay changes nothing.
    await produce(stream, [e.model_copy(update={"replay_id": "r2"}) for e in (first, later)], partition=0)
    await drained(stream, sessions, org)
    [again] = [i for i in await incidents(sessions, org.org_id) if i.sentry_issue_id == "31"]
    assert again.event_count == 2
    assert (await record_of(sessions, org, first.delivery_id)).replay_id == "r1"
    assert len(await timeline(sessions, incident.id)) == 2


async def drained(stream: Settings, sessions: async_sessionmaker[AsyncSession], org: Org) -> None:
    """Wait until the writer has processed everything produced so far to partition 0 of both topics:
    a marker produced after it on each topic is audited (a partition is processed in order)."""
    markers: list[OutputEvent] = [
        routed(org, issue=None, key="marker:1"),
        was_ignored(routed(org, issue=None, key="marker:2")),
    ]
    await produce(stream, markers, partition=0)

    async def audited() -> bool:
        deliveries = {r.delivery_id for r in await audit_records(sessions, org.slug)}
        return all(m.delivery_id in deliveries for m in markers)

    await wait_until(audited, within=30, what="the markers audited")


async def incidents_for_issue(sessions: async_sessionmaker[AsyncSession], org: Org, issue: str) -> list[object]:
    return [i for i in await incidents(sessions, org.org_id) if i.sentry_issue_id == issue]


async def test_a_routed_delivery_never_moves_nor_counts_again(
    stream: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    org = await make_org(sessions)
    event = routed(org, issue="41", service=0)
    await produce(stream, [event], partition=0)
    await wait_for_audit(sessions, org.slug, 1)
    # The mapping now points at service 1 (or is disabled): a replay re-routes the same delivery.
    moved = event.model_copy(update={"service_id": org.services[1], "mapping_id": org.mappings[1], "replay_id": "r"})
    disabled = was_ignored(event, Reason.MAPPING_INACTIVE).model_copy(update={"replay_id": "r"})
    await produce(stream, [moved, disabled], partition=0)
    await drained(stream, sessions, org)
    [incident] = await incidents_for_issue(sessions, org, "41")
    assert (incident.service_id, incident.event_count) == (org.services[0], 1)  # type: ignore[attr-defined]
    record = await record_of(sessions, org, event.delivery_id)
    assert (record.outcome, record.service_id, record.replay_id, record.previous_outcome) == (
        "routed",
        org.services[0],
        None,
        None,
    )


async def test_a_replayed_occurrence_older_than_the_resolution_counts_without_reopening(
    stream: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    org = await make_org(sessions)
    opened = routed(org, issue="51", minute=0)
    missed = routed(org, issue="51", minute=5)  # ignored at the time (say, the router had a bug)
    resolved = routed(org, resource="issue", action="resolved", issue="51", minute=10)
    await produce(stream, [opened, was_ignored(missed), resolved], partition=0)
    await wait_for_audit(sessions, org.slug, 3)

    await produce(stream, [missed.model_copy(update={"replay_id": "r"})], partition=0)
    await wait_until(lambda: routed_by_replay(sessions, org, missed.delivery_id, "r"), within=30, what="upgrade")
    [incident] = await incidents(sessions, org.org_id)
    assert (incident.status, incident.event_count) == ("resolved", 2)
    assert incident.resolved_at == resolved.received_at
    assert incident.last_seen_at == BASE_TIME + timedelta(minutes=5)
    changes = [e.change for e in await timeline(sessions, incident.id)]
    assert changes == ["opened", "resolved", "updated"]


async def test_ignored_then_routed_in_one_batch_takes_effect(
    stream: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """A redelivery after a mapping was added: both decisions of one delivery, in one batch."""
    org = await make_org(sessions)
    event = routed(org, issue="61")
    await produce(stream, [was_ignored(event), event], partition=0)
    await wait_until(lambda: incidents_for_issue(sessions, org, "61"), within=30, what="the incident")
    record = await record_of(sessions, org, event.delivery_id)
    assert record.outcome == "routed"
