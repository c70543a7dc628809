"""The backbone: ingest, router and writer as separate processes on the real broker and database.

A signed webhook goes in over HTTP; incidents and audit records come out in Postgres.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.models import AuditRecord, Incident, Service
from tests.support import signed_headers, wait_until
from tests.support.sentry import event_url, issue_body, payloads_dir, project_id
from tests.support.stack import (
    Stack,
    audit_of,
    audit_of_issue,
    body_of,
    incident_by_key,
    incidents_for,
    post,
    service_name,
)
from tests.support.writer import timeline

pytestmark = pytest.mark.integration


async def test_mapped_project_becomes_incident_on_mapped_service(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    response = await post(stack, issue_body("9000001", project="payments-api"))
    assert response.status_code == 200, response.text

    records = await wait_until(
        lambda: audit_of_issue(sessions, stack.org, "payments-api", "9000001"),
        within=60,
        what="audit record of payments-api",
    )
    assert [(r.outcome, r.reason) for r in records] == [("routed", None)]
    incidents = await incidents_for(sessions, stack.org, "9000001")
    assert len(incidents) == 1
    incident = incidents[0]
    async with sessions() as session:
        service = await session.get(Service, incident.service_id)
    assert service is not None and service.name == "Payments API"
    assert incident.status == "open" and incident.event_count == 1
    assert incident.title == "ReferenceError: blooopy is not defined"
    assert records[0].incident_id == incident.id


async def test_unmapped_project_is_acknowledged_and_audited_without_incident(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    response = await post(stack, issue_body("9000002", project="not-mapped-anywhere"))
    assert response.status_code == 200, response.text

    records = await wait_until(
        lambda: audit_of_issue(sessions, stack.org, "not-mapped-anywhere", "9000002"),
        within=60,
        what="unmapped audit record",
    )
    assert [(r.outcome, r.reason, r.incident_id) for r in records] == [("ignored", "unmapped", None)]
    assert await incidents_for(sessions, stack.org, "9000002") == []


async def test_disabled_mapping_is_acknowledged_and_audited_without_incident(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    response = await post(stack, issue_body("9000003", project="internal-tools"))
    assert response.status_code == 200, response.text

    records = await wait_until(
        lambda: audit_of_issue(sessions, stack.org, "internal-tools", "9000003"),
        within=60,
        what="inactive audit record",
    )
    assert [(r.outcome, r.reason, r.incident_id) for r in records] == [("ignored", "mapping_inactive", None)]
    assert records[0].service_id is not None
    assert await incidents_for(sessions, stack.org, "9000003") == []


async def test_rejections_are_defined_answers(stack: Stack) -> None:
    body = issue_body("9000004", project="frontend")
    bad_sig = await stack.client.post(
        stack.webhook_url,
        content=body,
        headers={**signed_headers(stack.secret, body, "issue"), "Sentry-Hook-Signature": "0" * 64},
    )
    unknown_org = await stack.client.post(
        stack.webhook_url.replace(stack.org, "no-such-org"),
        content=body,
        headers=signed_headers(stack.secret, body, "issue"),
    )
    assert bad_sig.status_code == unknown_org.status_code == 401
    assert bad_sig.json() == unknown_org.json()

    not_json = b"{not json"
    bad_json = await stack.client.post(
        stack.webhook_url, content=not_json, headers=signed_headers(stack.secret, not_json, "issue")
    )
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "bad_json"

    slash = await stack.client.post(
        stack.webhook_url + "/", content=body, headers=signed_headers(stack.secret, body, "issue")
    )
    assert slash.status_code == 200


async def test_services_expose_metrics(stack: Stack) -> None:
    for port in (stack.settings.ingest_port, stack.settings.router_metrics_port, stack.settings.writer_metrics_port):
        response = await stack.client.get(f"http://127.0.0.1:{port}/metrics")
        assert response.status_code == 200
        assert "blametrail_" in response.text


def _niceness(pid: int) -> set[int]:
    """The niceness of every thread of ``pid`` (``/proc/<pid>/task/<tid>/stat``, field 19)."""
    return {int(stat.read_text().rsplit(")", 1)[1].split()[16]) for stat in Path(f"/proc/{pid}/task").glob("*/stat")}


def test_consumers_yield_the_cpu_to_ingest(stack: Stack) -> None:
    """Router and writer run ``consumer_nice`` above the niceness they were started with, every
    thread of them (the metrics server's too); ingest keeps it."""
    inherited = os.nice(0)  # this process's, which the services inherit
    ingest, router, writer = (process.proc.pid for process in stack.processes)
    assert stack.settings.consumer_nice == 10  # the default
    assert _niceness(ingest) == {inherited}
    assert _niceness(router) == _niceness(writer) == {min(19, inherited + 10)}
    assert len(list(Path(f"/proc/{router}/task").iterdir())) > 1  # the metrics thread, at least


def test_payload_dir_exists() -> None:
    assert Path(payloads_dir(), "issue.created.json").is_file()


# --- every incident-bearing resource, webhook in → incident, timeline and audit out ----------


async def test_error_event_alert_and_comment_build_one_incident_with_its_timeline(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    issue = "9100001"

    def error(body: dict[str, Any]) -> None:
        body["data"]["error"]["issue_id"] = issue
        body["data"]["error"]["project"] = int(project_id("frontend"))
        body["data"]["error"]["url"] = event_url(stack.org, "frontend", body["data"]["error"]["event_id"])

    def event_alert(body: dict[str, Any]) -> None:
        body["data"]["event"]["issue_id"] = issue
        body["data"]["event"]["project"] = int(project_id("frontend"))
        body["data"]["event"]["url"] = event_url(stack.org, "frontend", body["data"]["event"]["event_id"])

    def comment(body: dict[str, Any]) -> None:
        body["data"]["project_slug"] = "frontend"
        body["data"]["issue_id"] = int(issue)

    for name, resource, edit in [
        ("error.created.json", "error", error),
        ("event_alert.triggered.json", "event_alert", event_alert),
        ("comment.created.json", "comment", comment),
    ]:
        response = await post(stack, body_of(name, edit), resource)
        assert response.status_code == 200, response.text

        async def audited(resource: str = resource) -> list[AuditRecord]:
            return await audit_of(sessions, stack.org, resource)

        # one at a time: the comment attaches only once the incident exists
        await wait_until(audited, within=60, what=f"{resource} audited")

    [incident] = await incident_by_key(sessions, stack.org, f"issue:{issue}")
    assert await service_name(sessions, incident.service_id) == "Web App"
    assert (incident.status, incident.event_count, incident.level) == ("open", 2, "error")
    assert incident.title == "ReferenceError: blooopy is not defined"
    entries = await timeline(sessions, incident.id)
    assert [(e.resource, e.change) for e in entries] == [
        ("error", "opened"),
        ("event_alert", "updated"),
        ("comment", "attached"),
    ]
    assert entries[2].title == "adding a comment"
    for resource in ("error", "event_alert", "comment"):
        [record] = [r for r in await audit_of(sessions, stack.org, resource) if r.sentry_issue_id == issue]
        assert (record.outcome, record.project_slug, record.incident_id) == ("routed", "frontend", incident.id)


async def test_issue_lifecycle_resolves_and_reopens_its_incident(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    issue = "9100002"
    for action, status in [("created", "open"), ("resolved", "resolved"), ("unresolved", "open")]:
        response = await post(stack, issue_body(issue, project="email-worker", action=action))
        assert response.status_code == 200, response.text

        async def reached(status: str = status) -> list[Incident] | None:
            found = await incidents_for(sessions, stack.org, issue)
            return found if found and found[0].status == status else None

        [incident] = await wait_until(reached, within=60, what=f"incident {status} after issue.{action}")
    assert incident.event_count == 1
    assert await service_name(sessions, incident.service_id) == "Email Worker"
    assert [e.change for e in await timeline(sessions, incident.id)] == ["opened", "resolved", "reopened"]


async def test_metric_alert_opens_per_service_and_resolves(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    identifier = uuid.uuid4().hex[:12]

    def alert(action: str) -> Callable[[dict[str, Any]], None]:
        def edit(body: dict[str, Any]) -> None:
            body["action"] = action
            body["data"]["metric_alert"]["identifier"] = identifier
            body["data"]["metric_alert"]["projects"] = ["payments-api", "email-worker"]

        return edit

    key = f"metric_alert:{identifier}"
    for action, status in [("critical", "open"), ("resolved", "resolved")]:
        response = await post(stack, body_of("metric_alert.resolved.json", alert(action)), "metric_alert")
        assert response.status_code == 200, response.text

        async def reached(status: str = status) -> list[Incident] | None:
            found = await incident_by_key(sessions, stack.org, key)
            return found if len(found) == 2 and {i.status for i in found} == {status} else None

        found = await wait_until(reached, within=60, what=f"two metric alert incidents {status}")
    assert sorted([await service_name(sessions, i.service_id) for i in found]) == ["Email Worker", "Payments API"]
    assert [(i.event_count, i.level) for i in found] == [(1, "critical"), (1, "critical")]
    records = [r for r in await audit_of(sessions, stack.org, "metric_alert") if r.incident_id in {i.id for i in found}]
    assert sorted((r.action, r.project_slug) for r in records) == [
        ("critical", "email-worker"),
        ("critical", "payments-api"),
        ("resolved", "email-worker"),
        ("resolved", "payments-api"),
    ]
