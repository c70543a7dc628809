"""The backbone: ingest, router and writer as separate processes on the real broker and database.

A signed webhook goes in over HTTP; incidents and audit records come out in Postgres.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.models import AuditRecord, Incident, Organization, Service
from shared.settings import Settings
from tests.conftest import payloads_dir
from tests.support import ServiceProcess, blametrail_command, free_port, settings_env, signed_headers, wait_until

pytestmark = pytest.mark.integration

EXAMPLE = [  # the product page's example configuration
    ("frontend", "Web App", True),
    ("payments-api", "Payments API", True),
    ("email-worker", "Email Worker", True),
    ("internal-tools", "Internal Tools", False),
]


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
    settings = topics.model_copy(
        update={
            "ingest_port": port,
            "public_url": f"http://127.0.0.1:{port}",
            "router_metrics_port": free_port(),
            "writer_metrics_port": free_port(),
        }
    )
    env = settings_env(settings)
    org = f"e2e-{free_port()}"
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


def issue_body(project: str, issue_id: str, action: str = "created") -> bytes:
    body: dict[str, Any] = json.loads((payloads_dir() / "issue.created.json").read_bytes())
    body["action"] = action
    body["data"]["issue"]["id"] = issue_id
    body["data"]["issue"]["project"]["slug"] = project
    return json.dumps(body, separators=(",", ":")).encode()


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
    response = await post(stack, issue_body("payments-api", "9000001"))
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
    response = await post(stack, issue_body("not-mapped-anywhere", "9000002"))
    assert response.status_code == 200, response.text

    records = await wait_until(
        lambda: audit_for(sessions, stack.org, "not-mapped-anywhere"), within=60, what="unmapped audit record"
    )
    assert [(r.outcome, r.reason, r.incident_id) for r in records] == [("ignored", "unmapped", None)]
    assert await incidents_for(sessions, stack.org, "9000002") == []


async def test_disabled_mapping_is_acknowledged_and_audited_without_incident(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    response = await post(stack, issue_body("internal-tools", "9000003"))
    assert response.status_code == 200, response.text

    records = await wait_until(
        lambda: audit_for(sessions, stack.org, "internal-tools"), within=60, what="inactive audit record"
    )
    assert [(r.outcome, r.reason, r.incident_id) for r in records] == [("ignored", "mapping_inactive", None)]
    assert records[0].service_id is not None
    assert await incidents_for(sessions, stack.org, "9000003") == []


async def test_rejections_are_defined_answers(stack: Stack) -> None:
    body = issue_body("frontend", "9000004")
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
