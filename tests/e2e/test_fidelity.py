"""Sentry's real deliveries through ingest, router and writer as processes: renamed projects, seer,
archive and activity alerts (bodies shaped as Sentry's serializers build them)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.models import AuditRecord, Incident, Organization, SentryProjectMapping
from shared.events import delivery_id
from tests.support import settings_env, wait_until
from tests.support.metrics import scrape
from tests.support.sentry import event_url, issue_body, payload, project_id
from tests.support.stack import Stack, audit_for, cli, incidents_for, post, service_name
from tests.support.writer import timeline

pytestmark = pytest.mark.integration

CHECKOUT_ID = "4505877312345088"  # Sentry's project id: a string in issue payloads, an integer in error ones


def dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


async def mapping_of(sessions: async_sessionmaker[AsyncSession], org: str, slug: str) -> SentryProjectMapping:
    async with sessions() as session:
        mapping = await session.scalar(
            select(SentryProjectMapping)
            .join(Organization, Organization.id == SentryProjectMapping.org_id)
            .where(Organization.slug == org, SentryProjectMapping.sentry_project_slug == slug)
        )
    assert mapping is not None
    return mapping


async def audited(sessions: async_sessionmaker[AsyncSession], delivery: str) -> AuditRecord | None:
    async with sessions() as session:
        return await session.scalar(select(AuditRecord).where(AuditRecord.delivery_id == delivery))


async def send_until_routed(
    stack: Stack, sessions: async_sessionmaker[AsyncSession], delivery: Callable[[int], tuple[bytes, str]], what: str
) -> AuditRecord:
    """Post ``delivery(n)`` (body, resource) for n = 1, 2, … until one is routed; its audit record.

    The router reloads its cache on the mapping's NOTIFY within about a second of the writer
    learning something; a delivery the router saw before that reload is (correctly) ignored.
    """
    n = 0

    async def attempt() -> AuditRecord | None:
        nonlocal n
        n += 1
        body, resource = delivery(n)
        assert (await post(stack, body, resource)).status_code == 200
        key = delivery_id(stack.org, resource, body)
        record = await wait_until(lambda: audited(sessions, key), within=30, what=f"audit of delivery {n}")
        return record if record.outcome == "routed" else None

    return await wait_until(attempt, within=90, what=what)


async def test_a_project_renamed_in_sentry_keeps_routing_and_is_flagged(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    env = settings_env(stack.settings)
    cli(env, "service", "create", "--org", stack.org, "Checkout")
    cli(env, "mapping", "add", "--org", stack.org, "checkout", "--service", "Checkout")
    response = await post(stack, issue_body("9200000", project="checkout", sentry_project_id=CHECKOUT_ID))
    assert response.status_code == 200

    async def learned() -> bool:
        return (await mapping_of(sessions, stack.org, "checkout")).sentry_project_id == CHECKOUT_ID

    await wait_until(learned, within=60, what="the mapping learning its Sentry project id")

    # Sentry renames the project: its deliveries now carry the new slug and the same id.
    def renamed_issue(n: int) -> tuple[bytes, str]:
        return issue_body(str(9200000 + n), project="checkout-web", sentry_project_id=CHECKOUT_ID), "issue"

    record = await send_until_routed(stack, sessions, renamed_issue, "a renamed project routed by its id")
    assert (record.project_slug, record.renamed_from) == ("checkout-web", "checkout")
    [incident] = await incidents_for(sessions, stack.org, record.sentry_issue_id or "")
    assert await service_name(sessions, incident.service_id) == "Checkout"

    async def flagged() -> bool:
        return (await mapping_of(sessions, stack.org, "checkout")).renamed_to == "checkout-web"

    await wait_until(flagged, within=30, what="the mapping flagged with the new slug")
    assert await scrape(stack.settings.router_metrics_port, "blametrail_router_renamed_projects_total") >= 1

    # An error event carries the id as an integer, the slug only in its url.
    error = payload("error.created")
    error["data"]["error"].update(
        issue_id="9200100",
        project=int(CHECKOUT_ID),
        url=event_url(stack.org, "checkout-web", error["data"]["error"]["event_id"]),
    )
    body = dumps(error)
    assert (await post(stack, body, "error")).status_code == 200
    key = delivery_id(stack.org, "error", body)
    error_record = await wait_until(lambda: audited(sessions, key), within=60, what="the error audited")
    assert (error_record.outcome, error_record.renamed_from) == ("routed", "checkout")

    # A metric alert names projects by slug only: the new slug resolves through the learned pair.
    def metric_alert(n: int) -> tuple[bytes, str]:
        body = payload("metric_alert.resolved")
        body["action"] = "critical"
        body["data"]["metric_alert"]["identifier"] = f"rename-{n}"
        body["data"]["metric_alert"]["projects"] = ["checkout-web"]
        return dumps(body), "metric_alert"

    alert = await send_until_routed(stack, sessions, metric_alert, "a metric alert naming the new slug routed")
    assert (alert.project_slug, alert.renamed_from) == ("checkout-web", "checkout")
    assert await service_name(sessions, alert.service_id or 0) == "Checkout"


async def test_a_seer_delivery_lands_on_its_issues_incident(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    issue = "9300001"
    assert (await post(stack, issue_body(issue, project="email-worker"))).status_code == 200
    [incident] = await wait_until(lambda: incidents_for(sessions, stack.org, issue), within=60, what="incident")

    seer = payload("seer.root_cause_completed")
    seer["data"]["group_id"] = int(issue)
    assert (await post(stack, dumps(seer), "seer")).status_code == 200

    async def attached() -> list[str] | None:
        entries = [(e.resource, e.change) for e in await timeline(sessions, incident.id)]
        return [c for r, c in entries if r == "seer"] or None

    assert await wait_until(attached, within=60, what="seer on the timeline") == ["attached"]
    [record] = [r for r in await audit_for(sessions, stack.org, "email-worker") if r.resource == "seer"]
    assert (record.outcome, record.incident_id) == ("routed", incident.id)

    # A seer delivery for an issue no delivery ever named stays ignored, saying why.
    stray = payload("seer.root_cause_started")
    stray["data"]["group_id"] = 9399999
    assert (await post(stack, dumps(stray), "seer")).status_code == 200

    async def stray_audit() -> AuditRecord | None:
        async with sessions() as session:
            return await session.scalar(
                select(AuditRecord).where(AuditRecord.org_slug == stack.org, AuditRecord.sentry_issue_id == "9399999")
            )

    ignored = await wait_until(stray_audit, within=60, what="the stray seer delivery audited")
    assert (ignored.outcome, ignored.reason, ignored.project_slug) == ("ignored", "no_project", None)


async def walk(
    stack: Stack, sessions: async_sessionmaker[AsyncSession], issue: str, steps: list[tuple[bytes, str, str, int]]
) -> Incident:
    """Post each (body, resource, expected status, expected event count) and wait for that state,
    with the delivery on the incident's timeline."""
    incident: Incident | None = None
    for n, (body, resource, status, count) in enumerate(steps, start=1):
        response: httpx.Response = await post(stack, body, resource)
        assert response.status_code == 200, response.text

        async def reached(status: str = status, count: int = count, entries: int = n) -> Incident | None:
            found = await incidents_for(sessions, stack.org, issue)
            if not found or (found[0].status, found[0].event_count) != (status, count):
                return None
            return found[0] if len(await timeline(sessions, found[0].id)) == entries else None

        incident = await wait_until(reached, within=60, what=f"{resource} → {status}, {count} events")
    assert incident is not None
    return incident


async def test_archive_mutes_occurrences_until_unresolved(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    issue = "9400001"
    incident = await walk(
        stack,
        sessions,
        issue,
        [
            (issue_body(issue, project="email-worker"), "issue", "open", 1),
            (issue_body(issue, project="email-worker", action="ignored"), "issue", "archived", 1),
            (issue_body(issue, project="email-worker", count=2), "issue", "archived", 2),
            (issue_body(issue, project="email-worker", action="unresolved"), "issue", "open", 2),
            (issue_body(issue, project="email-worker", action="archived"), "issue", "archived", 2),
            (issue_body(issue, project="email-worker", action="resolved"), "issue", "resolved", 2),
        ],
    )
    changes = [e.change for e in await timeline(sessions, incident.id)]
    assert changes == ["opened", "archived", "updated", "reopened", "archived", "resolved"]


def activity_alert(issue: str, project: str, activity_type: str) -> bytes:
    data = payload("sentry-test-fixtures/activity_alert.triggered.data")
    data["issue"].update(id=issue, project={"id": project_id(project), "slug": project})
    data["activity"] = {"type": activity_type}
    return dumps({"action": "triggered", "data": data})


async def test_activity_alerts_resolve_reopen_and_archive(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    issue = "9500001"
    incident = await walk(
        stack,
        sessions,
        issue,
        [
            (issue_body(issue, project="frontend"), "issue", "open", 1),
            (activity_alert(issue, "frontend", "status_resolved_in_release"), "activity_alert", "resolved", 1),
            (activity_alert(issue, "frontend", "status_regression"), "activity_alert", "open", 1),
            (activity_alert(issue, "frontend", "status_ignored"), "activity_alert", "archived", 1),
            (activity_alert(issue, "frontend", "status_escalating"), "activity_alert", "open", 1),
            (activity_alert(issue, "frontend", "appeared_in_pull_request"), "activity_alert", "open", 1),
        ],
    )
    changes = [e.change for e in await timeline(sessions, incident.id)]
    assert changes == ["opened", "resolved", "reopened", "archived", "reopened", "attached"]
