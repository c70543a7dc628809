"""The pipeline as separate processes for end-to-end tests, and what to read back from Postgres."""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.models import AuditRecord, Incident, Organization, Service
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
from tests.support.sentry import payloads_dir

EXAMPLE = PRODUCT_PAGE_EXAMPLE


@dataclass
class Stack:
    settings: Settings
    org: str
    secret: str
    webhook_url: str
    processes: list[ServiceProcess]
    client: httpx.AsyncClient
    api_token: str = ""


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([*blametrail_command(), *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"blametrail {' '.join(args)} failed: {done.stderr}"
    return done.stdout


@contextlib.asynccontextmanager
async def running_stack(topics: Settings, log_dir: Path) -> AsyncIterator[Stack]:
    """Ingest, router and writer as processes on topics and groups of their own, with one org
    mapped as the product page shows (created through the CLI)."""
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

    processes = [ServiceProcess(name, env, log_dir) for name in ("ingest", "router", "writer")]
    client = httpx.AsyncClient(timeout=5.0)

    urls = [
        f"http://127.0.0.1:{port}/readyz",
        f"http://127.0.0.1:{settings.router_metrics_port}/metrics",
        f"http://127.0.0.1:{settings.writer_metrics_port}/metrics",
    ]

    async def all_ready() -> bool:
        for p in processes:
            assert p.alive(), f"{p.command} exited:\n{p.output()}"
        try:
            return all([(await client.get(url)).status_code == 200 for url in urls])
        except httpx.TransportError:
            return False

    try:
        await wait_until(all_ready, within=60, what="ingest /readyz and the router's and writer's /metrics")
        yield Stack(
            settings, org, created["client_secret"], created["webhook_url"], processes, client, created["api_token"]
        )
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


async def audit_of_issue(
    sessions: async_sessionmaker[AsyncSession], org: str, project: str, issue_id: str
) -> list[AuditRecord]:
    """The org's audit records of one project and Sentry issue (other tests share the stack's org)."""
    return [r for r in await audit_for(sessions, org, project) if r.sentry_issue_id == issue_id]


async def incidents_for(sessions: async_sessionmaker[AsyncSession], org: str, issue_id: str) -> list[Incident]:
    async with sessions() as session:
        rows = await session.scalars(
            select(Incident)
            .join(Organization, Organization.id == Incident.org_id)
            .where(Organization.slug == org, Incident.sentry_issue_id == issue_id)
        )
        return list(rows)


def body_of(name: str, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """A payload of the team's Sentry corpus, edited for this test (projects, ids)."""
    body: dict[str, Any] = json.loads((payloads_dir() / name).read_bytes())
    edit(body)
    return json.dumps(body, separators=(",", ":")).encode()


async def incident_by_key(sessions: async_sessionmaker[AsyncSession], org: str, key: str) -> list[Incident]:
    async with sessions() as session:
        rows = await session.scalars(
            select(Incident)
            .join(Organization, Organization.id == Incident.org_id)
            .where(Organization.slug == org, Incident.incident_key == key)
            .order_by(Incident.id)
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
