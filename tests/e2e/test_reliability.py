"""Odd but valid Sentry values through ingest, router and writer as processes: every later delivery
is still audited, and the admin API still reads the org's incidents."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from admin.app import create_app
from shared.mappings import unmapped_projects
from shared.settings import Settings
from tests.support import settings_env, signed_headers, wait_until
from tests.support.sentry import issue_body, payload, project_id
from tests.support.stack import Stack, audit_for, cli, incidents_for, post

pytestmark = pytest.mark.integration

LIVE_WITHIN = 1.0  # seconds from an org's creation to its webhooks being accepted (issue 16, item 8)


@pytest.fixture
async def admin(stack: Stack, migrated: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(migrated)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://admin",
        headers={"Authorization": f"Bearer {stack.api_token}"},
    ) as client:
        yield client
    await app.state.engine.dispose()


def odd_issue(issue_id: str, action: str, last_seen: str, count: int) -> bytes:
    body = payload("issue.created")
    body["action"] = action
    issue = body["data"]["issue"]
    issue.update(id=issue_id, lastSeen=last_seen, firstSeen=last_seen, count=str(count), title="Odd\u0000 times")
    issue["project"] = {"id": project_id("payments-api"), "slug": "payments-api", "name": "payments-api"}
    return json.dumps(body, separators=(",", ":")).encode()


async def test_a_year_10000_time_and_a_nul_stop_nothing(
    stack: Stack, sessions: async_sessionmaker[AsyncSession], admin: httpx.AsyncClient
) -> None:
    year_10000 = "9999-12-31T23:59:59-14:00"  # valid RFC 3339; past year 9999 once in UTC
    bodies = [
        odd_issue("77\u000077", "created", year_10000, 1),
        odd_issue("77\u000077", "created", year_10000, 2),
        odd_issue("77\u000077", "resolved", year_10000, 2),
    ]
    for body in bodies:
        assert (await post(stack, body)).status_code == 200

    async def audited() -> list[object] | None:
        records = [r for r in await audit_for(sessions, stack.org, "payments-api") if r.sentry_issue_id == "7777"]
        return list(records) if len(records) == 3 else None

    await wait_until(audited, within=60, what="every delivery of the odd issue audited")
    records = [r for r in await audit_for(sessions, stack.org, "payments-api") if r.sentry_issue_id == "7777"]
    assert {r.outcome for r in records} == {"routed"}
    assert all(set(r.flags or ()) == {"time_out_of_range", "text_cleaned"} for r in records)
    [incident] = await incidents_for(sessions, stack.org, "7777")  # one Sentry issue, one incident
    assert (incident.status, incident.event_count, incident.title) == ("resolved", 2, "Odd times")
    assert incident.last_seen_at.year < 9999

    response = await admin.get("/api/v1/incidents")
    assert response.status_code == 200, response.text
    assert any(i["sentry_issue_id"] == "7777" for i in response.json()["items"])
    audit = await admin.get("/api/v1/integrations/sentry/audit", params={"project": "payments-api"})
    assert audit.status_code == 200, audit.text


async def test_a_new_org_is_live_at_once(stack: Stack, sessions: async_sessionmaker[AsyncSession]) -> None:
    """Refused a moment before it was created (ingest caches the unknown org for its TTL), accepted
    within a second after (NOTIFY), and audited as unmapped (in its inbox), not unknown.
    ``tests/ingest/test_secrets_notify.py`` shows the same with a TTL of minutes (NOTIFY alone)."""
    env = settings_env(stack.settings)
    org = f"new-{uuid.uuid4().hex[:8]}"
    url = stack.settings.webhook_url(org)
    body = issue_body("5100001", project="fresh-project")
    early = await stack.client.post(url, content=body, headers=signed_headers("not-yet-a-secret", body, "issue"))
    assert early.status_code == 401, early.text
    created = json.loads(cli(env, "org", "create", org))

    async def accepted() -> bool:
        headers = signed_headers(created["client_secret"], body, "issue")
        return (await stack.client.post(url, content=body, headers=headers)).status_code == 200

    await wait_until(accepted, within=LIVE_WITHIN, what="the new org's webhook to be accepted")
    [record] = await wait_until(lambda: audit_for(sessions, org, "fresh-project"), within=60, what="audit")
    assert (record.outcome, record.reason) == ("ignored", "unmapped")
    async with sessions() as session:
        inbox = await unmapped_projects(session, record.org_id or 0)
    assert [p.slug for p in inbox] == ["fresh-project"]
