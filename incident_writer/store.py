"""Writes one batch of routed/ignored events in one transaction: audit records, then incidents.

Idempotent: the audit record's unique (delivery_id, project_slug) decides whether an event is new;
only a new event may change an incident, so redeliveries and replays change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import ARRAY, String, case, func, literal, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql import ColumnElement

from incident_writer.incidents import LEVELS, IncidentAction, incident_action
from shared.db.models import AuditRecord, Incident, Organization
from shared.events import OutputEvent, RoutedEvent


@dataclass
class BatchResult:
    written: int = 0
    duplicates: int = 0
    incidents: dict[str, int] = field(default_factory=dict)

    def count(self, change: str) -> None:
        self.incidents[change] = self.incidents.get(change, 0) + 1


def _rank(level: ColumnElement[str | None] | InstrumentedAttribute[str | None]) -> ColumnElement[int]:
    return func.coalesce(func.array_position(literal(list(LEVELS), ARRAY(String)), level), 0)


async def write_batch(session: AsyncSession, batch: Sequence[OutputEvent]) -> BatchResult:
    """Apply ``batch`` in the caller's transaction (the caller commits)."""
    result = BatchResult()
    slugs = {e.org for e in batch}
    rows = await session.execute(select(Organization.slug, Organization.id).where(Organization.slug.in_(slugs)))
    org_ids = {slug: org_id for slug, org_id in rows}
    for event in batch:
        org_id = org_ids.get(event.org)
        audit_id = await session.scalar(
            insert(AuditRecord)
            .values(
                delivery_id=event.delivery_id,
                project_slug=event.project_slug,
                org_id=org_id,
                org_slug=event.org,
                resource=event.resource,
                action=event.action,
                outcome=event.outcome,
                reason=getattr(event, "reason", None),
                service_id=event.service_id,
                mapping_id=event.mapping_id,
                sentry_issue_id=event.sentry_issue_id,
                title=event.title,
                received_at=event.received_at,
                raw_topic=event.raw.topic,
                raw_partition=event.raw.partition,
                raw_offset=event.raw.offset,
            )
            .on_conflict_do_nothing(index_elements=["delivery_id", "project_slug"])
            .returning(AuditRecord.id)
        )
        if audit_id is None:
            result.duplicates += 1
            continue
        result.written += 1
        if isinstance(event, RoutedEvent) and event.incident_key and org_id is not None:
            incident_id = await _apply_incident(session, event, org_id, result)
            if incident_id is not None:
                await session.execute(
                    update(AuditRecord).where(AuditRecord.id == audit_id).values(incident_id=incident_id)
                )
    return result


async def _apply_incident(session: AsyncSession, event: RoutedEvent, org_id: int, result: BatchResult) -> int | None:
    assert event.incident_key is not None
    where = (Incident.service_id == event.service_id, Incident.incident_key == event.incident_key)
    action = incident_action(event.resource, event.action)
    seen_at = event.occurred_at or event.received_at
    if action is IncidentAction.OCCURRENCE:
        values = insert(Incident).values(
            org_id=org_id,
            service_id=event.service_id,
            incident_key=event.incident_key,
            sentry_project_slug=event.project_slug,
            sentry_issue_id=event.sentry_issue_id,
            title=event.title or f"{event.resource} in {event.project_slug}",
            level=event.level,
            culprit=event.culprit,
            web_url=event.web_url,
            status="open",
            event_count=1,
            first_seen_at=seen_at,
            last_seen_at=seen_at,
        )
        excluded = values.excluded
        stmt = values.on_conflict_do_update(
            index_elements=["service_id", "incident_key"],
            set_={
                "event_count": Incident.event_count + 1,
                "last_seen_at": func.greatest(Incident.last_seen_at, excluded.last_seen_at),
                "first_seen_at": func.least(Incident.first_seen_at, excluded.first_seen_at),
                "level": case((_rank(excluded.level) > _rank(Incident.level), excluded.level), else_=Incident.level),
                "web_url": func.coalesce(Incident.web_url, excluded.web_url),
                "status": "open",
                "resolved_at": None,
                "updated_at": func.now(),
            },
        ).returning(Incident.id, Incident.event_count)
        row = (await session.execute(stmt)).one()
        result.count("opened" if row.event_count == 1 else "updated")
        return int(row.id)
    if action is IncidentAction.RESOLVE:
        incident_id: int | None = await session.scalar(
            update(Incident)
            .where(*where)
            .values(status="resolved", resolved_at=func.now(), updated_at=func.now())
            .returning(Incident.id)
        )
        if incident_id is not None:
            result.count("resolved")
        return incident_id
    if action is IncidentAction.REOPEN:
        reopened: int | None = await session.scalar(
            update(Incident)
            .where(*where, Incident.status != "open")
            .values(status="open", resolved_at=None, updated_at=func.now())
            .returning(Incident.id)
        )
        if reopened is not None:
            result.count("reopened")
            return reopened
    existing: int | None = await session.scalar(select(Incident.id).where(*where))
    return existing
