"""The backbone: ingest, router and writer as separate processes on the real broker and database.

A signed webhook goes in over HTTP; incidents and audit records come out in Postgres.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.models import AuditRecord, Incident, IncidentEvent, Organization, Service
from shared.kafka import create_topics
from shared.settings import Settings
from tests.support import (
    PRODUCT_PAGE_EXAMPLE,
    ServiceProcess,
    blametrail_command,
    free_port,
    settings_env,
    signed_headers,
    wait_until,
)
from tests.support.sentry import issue_body, payloads_dir

pytestmark = pytest.mark.integration

EXAMPLE = PRODUCT_PAGE_EXAMPLE


@dataclass
class Stack:
    settings: Settings
    org: str
    secret: str
    webhook_url: str
    processes: list[ServiceProcess]
    client: httpx.AsyncClient


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([*blametrail_command(), *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"blametrail {' '.join(args)} failed: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
async def stack(topics: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    port = free_port()
    # Topics and groups of its own: other modules publish deliberately bad records to the session's
    # topics, which this stack's router must not see.
    prefix = f"e2e-{uuid.uuid4().hex[:8]}."
    settings = topics.model_copy(
        update={
            "topic_prefix": prefix,
            "router_group": prefix + "router",
            "writer_group": prefix + "writer",
            "ingest_port": port,
            "public_url": f"http://127.0.0.1:{port}",
            "router_metrics_port": free_port(),
            "writer_metrics_port": free_port(),
        }
    )
    await create_topics(settings)
    env = settings_env(settings)
    org = f"e2e-{uuid.uuid4().hex[:10]}"
    created = json.loads(cli(env, "org", "create", org, "--name", "E2E Org"))
    assert set(created) == {"org", "api_token", "webhook_url", "client_secret"}
    assert created["webhook_url"] == f"http://127.0.0.1:{port}/webhooks/sentry/{org}"
    for project, service, active in EXAMPLE:
        cli(env, "service", "create", "--org", org, service)
        cli(env, "mapping", "add", "--org", org, project, "--service", service, *([] if active else ["--inactive"]))

    log_dir = tmp_path_factory.mktemp("services")
    processes = [ServiceProcess(name, env, log_dir) for name in ("ingest", "router", "writer")]
    client = httpx.AsyncClient(timeout=5.0)

    async def ingest_ready() -> bool:
        for p in processes:
            assert p.alive(), f"{p.command} exited:\n{p.output()}"
        try:
            return (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    try:
        await wait_until(ingest_ready, within=60, what="ingest /readyz")
        yield Stack(settings, org, created["client_secret"], created["webhook_url"], processes, client)
    finally:
        await client.aclose()
        codes = {p.command: p.stop() for p in processes}
        for p in processes:
            print(f"----- {p.command} (exit {codes[p.command]})\n{p.output()[-4000:]}")
        # uvicorn re-raises SIGTERM after its graceful shutdown: -15 is its clean exit.
        assert codes["ingest"] in (0, -15) and codes["router"] == codes["writer"] == 0, (
            f"services did not shut down cleanly: {codes}"
        )


async def post(stack: Stack, body: bytes, resource: str = "issue") -> httpx.Response:
    return await stack.client.post(
        stack.webhook_url, content=body, headers=signed_headers(stack.secret, body, resource)
    )


async def audit_for(sessions: async_sessionmaker[AsyncSession], org: str, project: str) -> list[AuditRecord]:
    async with sessions() as session:
        rows = await session.scalars(
            select(AuditRecord).where(AuditRecord.org_slug == org, AuditRecord.project_slug == project)
        )
        return list(rows)


async def incidents_for(sessions: async_sessionmaker[AsyncSession], org: str, issue_id: str) -> list[Incident]:
    async with sessions() as session:
        rows = await session.scalars(
            select(Incident)
            .join(Organization, Organization.id == Incident.org_id)
            .where(Organization.slug == org, Incident.sentry_issue_id == issue_id)
        )
        return list(rows)


async def test_mapped_project_becomes_incident_on_mapped_service(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    response = await post(stack, issue_body("9000001", project="payments-api"))
    assert response.status_code == 200, response.text

    records = await wait_until(
        lambda: audit_for(sessions, stack.org, "payments-api"), within=60, what="audit record of payments-api"
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
        lambda: audit_for(sessions, stack.org, "not-mapped-anywhere"), within=60, what="unmapped audit record"
    )
    assert [(r.outcome, r.reason, r.incident_id) for r in records] == [("ignored", "unmapped", None)]
    assert await incidents_for(sessions, stack.org, "9000002") == []


async def test_disabled_mapping_is_acknowledged_and_audited_without_incident(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    response = await post(stack, issue_body("9000003", project="internal-tools"))
    assert response.status_code == 200, response.text

    records = await wait_until(
        lambda: audit_for(sessions, stack.org, "internal-tools"), within=60, what="inactive audit record"
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


def test_payload_dir_exists() -> None:
    assert Path(payloads_dir(), "issue.created.json").is_file()


# --- every incident-bearing resource, webhook in → incident, timeline and audit out ----------


def body_of(name: str, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """A payload of the team's Sentry corpus, edited for this test (projects, ids)."""
    body: dict[str, Any] = json.loads((payloads_dir() / name).read_bytes())
    edit(body)
    return json.dumps(body, separators=(",", ":")).encode()


def event_url(org: str, project: str, event_id: str) -> str:
    return f"https://sentry.io/api/0/projects/{org}/{project}/events/{event_id}/"


async def incident_by_key(sessions: async_sessionmaker[AsyncSession], org: str, key: str) -> list[Incident]:
    async with sessions() as session:
        rows = await session.scalars(
            select(Incident)
            .join(Organization, Organization.id == Incident.org_id)
            .where(Organization.slug == org, Incident.incident_key == key)
            .order_by(Incident.id)
        )
        return list(rows)


async def timeline_of(sessions: async_sessionmaker[AsyncSession], incident_id: int) -> list[IncidentEvent]:
    async with sessions() as session:
        rows = await session.scalars(
            select(IncidentEvent).where(IncidentEvent.incident_id == incident_id).order_by(IncidentEvent.id)
        )
        return list(rows)


async def audit_of(sessions: async_sessionmaker[AsyncSession], org: str, resource: str) -> list[AuditRecord]:
    async with sessions() as session:
        rows = await session.scalars(
            select(AuditRecord).where(AuditRecord.org_slug == org, AuditRecord.resource == resource)
        )
        return list(rows)


async def service_name(sessions: async_sessionmaker[AsyncSession], service_id: int) -> str:
    async with sessions() as session:
        service = await session.get(Service, service_id)
    assert service is not None
    return service.name


async def test_error_event_alert_and_comment_build_one_incident_with_its_timeline(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    issue = "9100001"

    def error(body: dict[str, Any]) -> None:
        body["data"]["error"]["issue_id"] = issue
        body["data"]["error"]["url"] = event_url(stack.org, "frontend", body["data"]["error"]["event_id"])

    def event_alert(body: dict[str, Any]) -> None:
        body["data"]["event"]["issue_id"] = issue
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
    entries = await timeline_of(sessions, incident.id)
    assert [(e.resource, e.change) for e in entries] == [
        ("error", "opened"),
        ("event_alert", "updated"),
        ("comment", "attached"),
    ]
    assert entries[2].title == "adding a comment"
    for resource in ("error", "event_alert", "comment"):
        [record] = await audit_of(sessions, stack.org, resource)
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
    assert [e.change for e in await timeline_of(sessions, incident.id)] == ["opened", "resolved", "reopened"]


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
