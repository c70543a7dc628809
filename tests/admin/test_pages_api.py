"""What the web pages added to the API: one incident by id, and the replay id on timeline entries."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.models import AuditRecord, IncidentEvent
from tests.admin.conftest import Org, error
from tests.admin.test_api import incident, service

pytestmark = pytest.mark.integration


async def test_one_incident_and_its_replayed_timeline_entry(
    org: Org, other: Org, sessions: async_sessionmaker[AsyncSession]
) -> None:
    incident_id = await incident(sessions, org, await service(org, "Web App"), title="boom", web_url="https://s/1")
    now = datetime.now(UTC)
    async with sessions() as session, session.begin():
        for replay in (None, "rp-1"):
            delivery = uuid.uuid4().hex
            await session.execute(
                insert(AuditRecord).values(
                    delivery_id=delivery, org_id=org.id, org_slug=org.slug, project_slug="frontend", resource="issue",
                    action="created", outcome="routed", incident_id=incident_id, received_at=now, raw_topic="t",
                    raw_partition=0, raw_offset=0, replay_id=replay,
                )
            )  # fmt: skip
            await session.execute(
                insert(IncidentEvent).values(
                    incident_id=incident_id, delivery_id=delivery, project_slug="frontend", resource="issue",
                    action="created", change="updated", received_at=now,
                )
            )  # fmt: skip

    got = (await org.client.get(f"/api/v1/incidents/{incident_id}")).json()
    assert (got["id"], got["title"], got["web_url"], got["status"]) == (incident_id, "boom", "https://s/1", "open")
    timeline = (await org.client.get(f"/api/v1/incidents/{incident_id}/events")).json()
    assert [e["replay_id"] for e in timeline] == [None, "rp-1"]
    error(await other.client.get(f"/api/v1/incidents/{incident_id}"), 404)
    error(await org.client.get("/api/v1/incidents/987654321"), 404)
    error(await org.client.get("/api/v1/incidents/abc"), 422, "incident_id")
