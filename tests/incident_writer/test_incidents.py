"""Incident and audit rules through the real writer: events produced to Kafka, results read from Postgres."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from incident_writer.consumer import IncidentWriter
from shared.consumer import Batch, DeadLetter
from shared.events import Reason, RoutedEvent
from shared.settings import Settings
from tests.support.writer import (
    audit_records,
    delivery,
    ignored,
    incidents,
    isolated_settings,
    make_org,
    produce,
    routed,
    running_writer,
    timeline,
    wait_for_audit,
)

pytestmark = pytest.mark.integration


async def test_first_occurrence_opens_and_later_occurrences_update(
    stream: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    org = await make_org(sessions)
    events = [
        routed(org, resource="issue", action="created", issue="10", minute=0, level="warning", title="Boom"),
        routed(org, resource="error", action="created", issue="10", minute=5, level="error"),
        routed(org, resource="event_alert", action="triggered", issue="10", minute=3, level="info"),
    ]
    await produce(stream, events)
    records = await wait_for_audit(sessions, org.slug, 3)

    [incident] = await incidents(sessions, org.org_id)
    assert (incident.service_id, incident.incident_key, incident.status) == (org.services[0], "issue:10", "open")
    assert (incident.title, incident.event_count, incident.level) == ("Boom", 3, "error")
    assert incident.first_seen_at == events[0].occurred_at and incident.last_seen_at == events[1].occurred_at
    assert incident.web_url == events[0].web_url and incident.culprit == events[0].culprit
    assert incident.sentry_issue_id == "10" and incident.sentry_project_slug == "proj-0"
    assert [(r.outcome, r.incident_id, r.service_id, r.mapping_id) for r in records] == [
        ("routed", incident.id, org.services[0], org.mappings[0])
    ] * 3
    entries = await timeline(sessions, incident.id)
    assert [(e.delivery_id, e.change) for e in entries] == [
        (events[0].delivery_id, "opened"),
        (events[1].delivery_id, "updated"),
        (events[2].delivery_id, "updated"),
    ]
    assert [e.resource for e in entries] == ["issue", "error", "event_alert"]


async def test_resolve_and_reopen(stream: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
    org = await make_org(sessions)
    await produce(stream, [routed(org, issue="20"), routed(org, action="resolved", issue="20")])
    await wait_for_audit(sessions, org.slug, 2)
    [incident] = await incidents(sessions, org.org_id)
    assert (incident.status, incident.event_count) == ("resolved", 1)
    assert incident.resolved_at is not None

    await produce(stream, [routed(org, action="unresolved", issue="20", minute=30)])
    await wait_for_audit(sessions, org.slug, 3)
    [incident] = await incidents(sessions, org.org_id)
    assert (incident.status, incident.event_count, incident.resolved_at) == ("open", 1, None)

    await produce(stream, [routed(org, action="resolved", issue="20"), routed(org, resource="error", issue="20")])
    records = await wait_for_audit(sessions, org.slug, 5)
    [incident] = await incidents(sessions, org.org_id)
    assert (incident.status, incident.event_count) == ("open", 2)  # a new occurrence reopens
    assert [e.change for e in await timeline(sessions, incident.id)] == [
        "opened",
        "resolved",
        "reopened",
        "resolved",
        "reopened",
    ]
    assert {r.incident_id for r in records} == {incident.id}


async def test_lifecycle_events_without_an_incident_open_nothing(
    stream: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    org = await make_org(sessions)
    await produce(
        stream,
        [
            routed(org, action="resolved", issue="30"),
            routed(org, action="unresolved", issue="30"),
            routed(org, resource="comment", action="created", issue="30"),
        ],
    )
    records = await wait_for_audit(sessions, org.slug, 3)
    assert await incidents(sessions, org.org_id) == []
    assert [(r.outcome, r.incident_id) for r in records] == [("routed", None)] * 3


async def test_metric_alert_opens_escalates_and_resolves(
    stream: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    org = await make_org(sessions)

    def alert(action: str, minute: int) -> RoutedEvent:
        return routed(
            org, resource="metric_alert", action=action, issue=None, key="metric_alert:7", level=action, minute=minute
        )

    await produce(stream, [alert("warning", 0), alert("critical", 1)])
    await wait_for_audit(sessions, org.slug, 2)
    [incident] = await incidents(sessions, org.org_id)
    assert (incident.incident_key, incident.status, incident.level, incident.event_count) == (
        "metric_alert:7",
        "open",
        "critical",
        2,
    )
    await produce(stream, [alert("resolved", 2)])
    await wait_for_audit(sessions, org.slug, 3)
    [incident] = await incidents(sessions, org.org_id)
    assert (incident.status, incident.level, incident.event_count) == ("resolved", "critical", 2)


async def test_comments_assignments_and_other_resources_attach_to_the_timeline(
    stream: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    org = await make_org(sessions)
    opened = routed(org, issue="40")
    attached = [
        routed(org, resource="comment", action="created", issue="40", title="looking into it"),
        routed(org, resource="issue", action="assigned", issue="40"),
        routed(org, resource="seer", action="root_cause_completed", issue="40"),
    ]
    elsewhere = routed(org, resource="comment", action="created", issue="41")  # no incident for 41
    await produce(stream, [opened, *attached, elsewhere])
    records = await wait_for_audit(sessions, org.slug, 5)

    [incident] = await incidents(sessions, org.org_id)
    assert incident.event_count == 1 and incident.status == "open"
    entries = await timeline(sessions, incident.id)
    assert [(e.resource, e.action, e.change) for e in entries] == [
        ("issue", "created", "opened"),
        ("comment", "created", "attached"),
        ("issue", "assigned", "attached"),
        ("seer", "root_cause_completed", "attached"),
    ]
    assert entries[1].title == "looking into it"
    by_delivery = {r.delivery_id: r.incident_id for r in records}
    assert [by_delivery[e.delivery_id] for e in [opened, *attached]] == [incident.id] * 4
    assert by_delivery[elsewhere.delivery_id] is None


async def test_the_same_message_three_times_leaves_one_audit_record_and_counts_once(
    stream: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    org = await make_org(sessions)
    first = routed(org, issue="50")
    second = routed(org, resource="error", issue="50", minute=1)
    await produce(stream, [first, second])
    await wait_for_audit(sessions, org.slug, 2)
    marker = routed(org, issue="51")  # after the copies on one partition: once it is written, so are they
    await produce(stream, [second, second, second, first, marker], partition=0)
    await wait_for_audit(sessions, org.slug, 3)

    records = await audit_records(sessions, org.slug)
    assert sorted(r.delivery_id for r in records) == sorted([first.delivery_id, second.delivery_id, marker.delivery_id])
    incident = next(i for i in await incidents(sessions, org.org_id) if i.incident_key == "issue:50")
    assert incident.event_count == 2
    assert len(await timeline(sessions, incident.id)) == 2


async def test_ignored_events_are_audited_once_each_without_incident(
    stream: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    org = await make_org(sessions)
    unmapped = ignored(org)
    inactive = ignored(org, project="proj-1", reason=Reason.MAPPING_INACTIVE)
    no_project = ignored(org, project=None, reason=Reason.NO_PROJECT)
    marker = routed(org, issue="60")
    await produce(stream, [unmapped, unmapped, inactive, no_project, no_project, unmapped, marker], partition=0)
    await wait_for_audit(sessions, org.slug, 4)

    records = await audit_records(sessions, org.slug)
    assert sorted((r.outcome, r.reason, r.project_slug) for r in records) == sorted(
        [
            ("ignored", "unmapped", "unmapped-project"),
            ("ignored", "mapping_inactive", "proj-1"),
            ("ignored", "no_project", None),
            ("routed", None, "proj-0"),
        ]
    )
    assert [i.incident_key for i in await incidents(sessions, org.org_id)] == ["issue:60"]
    assert all(r.incident_id is None for r in records if r.outcome == "ignored")


async def test_mapping_moved_to_another_service_opens_there_and_the_old_incident_stays(
    stream: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    org = await make_org(sessions)
    await produce(stream, [routed(org, issue="70", service=0), routed(org, issue="70", service=0, minute=1)])
    await wait_for_audit(sessions, org.slug, 2)
    # the project's mapping now points at service 1: the router routes new events there
    await produce(
        stream,
        [
            routed(org, resource="error", issue="70", service=1, project="proj-0", minute=2),
            routed(org, action="resolved", issue="70", service=1, project="proj-0"),
        ],
    )
    await wait_for_audit(sessions, org.slug, 4)
    old, new = await incidents(sessions, org.org_id)
    assert (old.service_id, old.status, old.event_count) == (org.services[0], "open", 2)
    assert (new.service_id, new.status, new.event_count) == (org.services[1], "resolved", 1)
    assert old.incident_key == new.incident_key == "issue:70"


async def test_a_metric_alert_naming_two_projects_of_one_service_counts_once(
    stream: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    org = await make_org(sessions)
    shared_delivery = delivery(org.slug, "metric_alert", "body-1")

    def per_project(project: str, delivery_id: str, action: str = "critical") -> RoutedEvent:
        return routed(
            org,
            resource="metric_alert",
            action=action,
            issue=None,
            key="metric_alert:9",
            project=project,
            delivery_id=delivery_id,
        )

    await produce(stream, [per_project("proj-0", shared_delivery)])
    await wait_for_audit(sessions, org.slug, 1)
    # the second project of the same delivery arrives later (another batch): still one occurrence
    await produce(
        stream,
        [per_project("proj-0-web", shared_delivery), per_project("proj-0", delivery(org.slug, "body-2"))],
    )
    records = await wait_for_audit(sessions, org.slug, 3)
    [incident] = await incidents(sessions, org.org_id)
    assert incident.event_count == 2
    assert {r.incident_id for r in records} == {incident.id}
    assert len(await timeline(sessions, incident.id)) == 2


async def test_events_of_one_issue_in_one_batch_open_one_incident(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    settings = await isolated_settings(migrated, "one-batch")
    org = await make_org(sessions)
    events = [routed(org, issue="80", minute=i, delivery_id=delivery(org.slug, 80, i)) for i in range(50)]
    events += [routed(org, action="resolved", issue="80"), routed(org, resource="comment", issue="80")]
    await produce(settings, events, partition=0)  # all there before the writer's first poll: one batch
    async with running_writer(settings, BatchCountingWriter) as writer:
        await wait_for_audit(sessions, org.slug, len(events))
    assert isinstance(writer, BatchCountingWriter)
    assert writer.batches[0] == len(events), writer.batches
    [incident] = await incidents(sessions, org.org_id)
    assert (incident.event_count, incident.status) == (50, "resolved")
    assert len(await timeline(sessions, incident.id)) == 52


class BatchCountingWriter(IncidentWriter):
    """The writer, noting the size of every batch it handles."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.batches: list[int] = []

        process = self.runtime.step.process

        async def counting(batch: Batch) -> Sequence[DeadLetter]:
            self.batches.append(len(batch))
            return await process(batch)

        self.runtime.step.process = counting  # type: ignore[method-assign]
