"""The admin REST API against the real database: every rule of the product page, every error code.

The fixtures (``app``, ``org``, ``other``) and ``error`` are in ``tests/admin/conftest.py``."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.routing import Route

from shared.db.conninfo import MAPPINGS_CHANNEL, libpq_url
from shared.db.models import AuditRecord, Incident, IncidentEvent, SentryProjectMapping
from shared.settings import Settings
from tests.admin.conftest import Org, error

pytestmark = pytest.mark.integration


async def service(org: Org, name: str) -> int:
    response = await org.client.post("/api/v1/services", json={"name": name})
    assert response.status_code == 201, response.text
    service_id: int = response.json()["id"]
    return service_id


async def mapping(org: Org, slug: str, service_id: int, active: bool = True) -> dict[str, Any]:
    response = await org.client.post(
        "/api/v1/integrations/sentry/mappings",
        json={"sentry_project_slug": slug, "service_id": service_id, "active": active},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def incident(sessions: async_sessionmaker[AsyncSession], org: Org, service_id: int, **values: Any) -> int:
    now = datetime.now(UTC)
    base: dict[str, Any] = {
        "org_id": org.id,
        "service_id": service_id,
        "incident_key": f"issue:{uuid.uuid4().hex}",
        "title": "t",
        "first_seen_at": now,
        "last_seen_at": now,
    }
    async with sessions() as session, session.begin():
        result = await session.execute(insert(Incident).values(**{**base, **values}).returning(Incident.id))
        incident_id: int = result.scalar_one()
    return incident_id


async def test_product_page_example_configuration_round_trips(org: Org) -> None:
    services = {n: await service(org, n) for n in ("Web App", "Payments API", "Email Worker", "Internal Tools")}
    await mapping(org, "frontend", services["Web App"])
    await mapping(org, "payments-api", services["Payments API"])
    await mapping(org, "email-worker", services["Email Worker"])
    await mapping(org, "internal-tools", services["Internal Tools"], active=False)

    listed = (await org.client.get("/api/v1/integrations/sentry/mappings")).json()
    assert [(m["sentry_project_slug"], m["service_name"], m["active"]) for m in listed] == [
        ("email-worker", "Email Worker", True),
        ("frontend", "Web App", True),
        ("internal-tools", "Internal Tools", False),
        ("payments-api", "Payments API", True),
    ]
    assert set(listed[0]) == {
        "id", "sentry_project_slug", "service_id", "service_name", "active", "sentry_project_id", "renamed_to",
        "created_at", "updated_at", "last_event_at", "events_24h",
    }  # fmt: skip
    svc = (await org.client.get("/api/v1/services")).json()
    assert [s["name"] for s in svc] == ["Web App", "Payments API", "Email Worker", "Internal Tools"]
    integration = (await org.client.get("/api/v1/integrations/sentry")).json()
    assert integration["webhook_url"].endswith(f"/webhooks/sentry/{org.slug}")
    assert (integration["mappings"], integration["active_mappings"]) == (4, 3)


async def test_auth_is_required_and_checked(app: Starlette, org: Org) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin") as anon:
        error(await anon.get("/api/v1/services"), 401)
        error(await anon.get("/api/v1/services", headers={"Authorization": "Bearer nope"}), 401)
        error(await anon.get("/api/v1/services", headers={"Authorization": "Basic abc"}), 401)
        error(await anon.post("/api/v1/services", json={"name": "x"}), 401)


@pytest.mark.parametrize("slug", ["Frontend", "123", "", "has space", "a" * 101, "émoji", "dot.slug", "../x", 5, None])
async def test_invalid_project_slug_is_422_naming_the_field(org: Org, slug: object) -> None:
    service_id = await service(org, "Web App")
    response = await org.client.post(
        "/api/v1/integrations/sentry/mappings", json={"sentry_project_slug": slug, "service_id": service_id}
    )
    error(response, 422, "sentry_project_slug")


async def test_longest_valid_slug_is_accepted(org: Org) -> None:
    await mapping(org, "a" * 100, await service(org, "Web App"))


async def test_duplicate_mapping_is_409_naming_the_existing_one(org: Org) -> None:
    web, api = await service(org, "Web App"), await service(org, "API")
    first = await mapping(org, "frontend", web)
    response = await org.client.post(
        "/api/v1/integrations/sentry/mappings", json={"sentry_project_slug": "frontend", "service_id": api}
    )
    detail = error(response, 409, "sentry_project_slug")
    assert f"mapping {first['id']}" in detail["message"]


async def test_concurrent_adds_of_one_project_make_exactly_one_mapping(org: Org) -> None:
    ids = [await service(org, f"S{i}") for i in range(4)]
    responses = await asyncio.gather(
        *(
            org.client.post(
                "/api/v1/integrations/sentry/mappings",
                json={"sentry_project_slug": "racy", "service_id": ids[i % 4]},
            )
            for i in range(12)
        )
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] + [409] * 11, codes
    listed = (await org.client.get("/api/v1/integrations/sentry/mappings")).json()
    assert [m["sentry_project_slug"] for m in listed] == ["racy"]


async def test_many_projects_map_to_one_service(org: Org) -> None:
    api = await service(org, "API")
    await mapping(org, "api-auth", api)
    await mapping(org, "api-core", api)
    listed = (await org.client.get("/api/v1/integrations/sentry/mappings")).json()
    assert {m["service_id"] for m in listed} == {api} and len(listed) == 2


async def test_service_must_exist_in_the_same_org(org: Org, other: Org) -> None:
    foreign = await service(other, "Theirs")
    for service_id in (foreign, 987654321):
        response = await org.client.post(
            "/api/v1/integrations/sentry/mappings", json={"sentry_project_slug": "x", "service_id": service_id}
        )
        error(response, 422, "service_id")


async def test_other_orgs_ids_answer_404_like_missing_ones(org: Org, other: Org) -> None:
    theirs = await mapping(other, "frontend", await service(other, "Web App"))
    mine = await service(org, "Mine")
    for mapping_id in (theirs["id"], 987654321):
        path = f"/api/v1/integrations/sentry/mappings/{mapping_id}"
        missing = error(await org.client.patch(path, json={"active": False}), 404)
        assert missing["code"] == "not_found"
        error(await org.client.delete(path), 404)
    error(await org.client.delete(f"/api/v1/services/{theirs['service_id']}"), 404)
    # Nothing of theirs changed, and their mapping is still not in our list.
    assert (await other.client.get("/api/v1/integrations/sentry/mappings")).json()[0]["active"] is True
    assert (await org.client.get("/api/v1/integrations/sentry/mappings")).json() == []
    patch = await org.client.patch(f"/api/v1/integrations/sentry/mappings/{theirs['id']}", json={"service_id": mine})
    error(patch, 404)


async def test_disable_keeps_configuration_and_enable_restores_it(org: Org) -> None:
    web = await service(org, "Web App")
    created = await mapping(org, "frontend", web)
    path = f"/api/v1/integrations/sentry/mappings/{created['id']}"
    disabled = (await org.client.patch(path, json={"active": False})).json()
    assert (disabled["active"], disabled["service_id"], disabled["sentry_project_slug"]) == (False, web, "frontend")
    enabled = (await org.client.patch(path, json={"active": True})).json()
    assert (enabled["active"], enabled["service_id"]) == (True, web)
    assert enabled["updated_at"] >= created["updated_at"]


async def test_edit_changes_the_service_only_and_never_moves_incidents(
    org: Org, sessions: async_sessionmaker[AsyncSession]
) -> None:
    old, new = await service(org, "Old"), await service(org, "New")
    created = await mapping(org, "frontend", old)
    incident_id = await incident(sessions, org, old)
    edited = await org.client.patch(f"/api/v1/integrations/sentry/mappings/{created['id']}", json={"service_id": new})
    assert edited.status_code == 200
    body = edited.json()
    assert (body["service_id"], body["service_name"], body["active"], body["sentry_project_slug"]) == (
        new, "New", True, "frontend",
    )  # fmt: skip
    async with sessions() as session:
        assert await session.scalar(select(Incident.service_id).where(Incident.id == incident_id)) == old
    unknown_field = await org.client.patch(f"/api/v1/integrations/sentry/mappings/{created['id']}", json={"org_id": 1})
    error(unknown_field, 422, "org_id")


async def test_a_mapping_follows_a_project_renamed_in_sentry(org: Org) -> None:
    web = await service(org, "Web App")
    created = await mapping(org, "checkout", web)
    assert (created["sentry_project_id"], created["renamed_to"]) == (None, None)
    url = f"/api/v1/integrations/sentry/mappings/{created['id']}"
    renamed = await org.client.patch(
        url, json={"sentry_project_slug": "checkout-web", "sentry_project_id": "4505877312345088"}
    )
    assert renamed.status_code == 200, renamed.text
    body = renamed.json()
    assert (body["sentry_project_slug"], body["sentry_project_id"], body["id"]) == (
        "checkout-web",
        "4505877312345088",
        created["id"],
    )
    error(await org.client.patch(url, json={"sentry_project_id": "abc"}), 422, "sentry_project_id")
    error(await org.client.patch(url, json={"sentry_project_slug": "Bad Slug"}), 422, "sentry_project_slug")
    other = await mapping(org, "frontend", web)
    taken = await org.client.patch(
        f"/api/v1/integrations/sentry/mappings/{other['id']}", json={"sentry_project_slug": "checkout-web"}
    )
    error(taken, 409, "sentry_project_slug")
    with_id = await org.client.post(
        "/api/v1/integrations/sentry/mappings",
        json={"sentry_project_slug": "api", "service_id": web, "sentry_project_id": "4505877312345099"},
    )
    assert with_id.status_code == 201 and with_id.json()["sentry_project_id"] == "4505877312345099"


async def test_delete_mapping_then_service(org: Org) -> None:
    web = await service(org, "Web App")
    created = await mapping(org, "frontend", web)
    detail = error(await org.client.delete(f"/api/v1/services/{web}"), 409)
    assert "frontend" in detail["message"]
    assert (await org.client.delete(f"/api/v1/integrations/sentry/mappings/{created['id']}")).status_code == 204
    error(await org.client.delete(f"/api/v1/integrations/sentry/mappings/{created['id']}"), 404)
    assert (await org.client.delete(f"/api/v1/services/{web}")).status_code == 204
    assert (await org.client.get("/api/v1/services")).json() == []


async def test_malformed_json_and_bad_bodies(org: Org) -> None:
    bad = await org.client.post("/api/v1/services", content=b"{not json", headers={"Content-Type": "application/json"})
    assert error(bad, 400)["code"] == "malformed_json"
    error(await org.client.post("/api/v1/services", json={"name": ""}), 422, "name")
    error(await org.client.post("/api/v1/services", json={}), 422, "name")
    error(await org.client.post("/api/v1/services", json=["x"]), 422)
    await service(org, "Dup")
    error(await org.client.post("/api/v1/services", json={"name": "Dup"}), 409, "name")
    error(await org.client.post("/api/v1/integrations/sentry/mappings", json={"service_id": 1}), 422)
    error(await org.client.get("/api/v1/incidents?limit=0"), 422, "limit")
    error(await org.client.get("/api/v1/incidents?status=maybe"), 422, "status")


async def audit(sessions: async_sessionmaker[AsyncSession], org: Org, **values: Any) -> None:
    base: dict[str, Any] = {
        "delivery_id": uuid.uuid4().hex,
        "org_id": org.id,
        "org_slug": org.slug,
        "resource": "issue",
        "action": "created",
        "outcome": "ignored",
        "reason": "unmapped",
        "received_at": datetime.now(UTC),
        "raw_topic": "t",
        "raw_partition": 0,
        "raw_offset": 0,
    }
    async with sessions() as session, session.begin():
        await session.execute(insert(AuditRecord).values(**{**base, **values}))


async def test_unmapped_projects_inbox(org: Org, sessions: async_sessionmaker[AsyncSession]) -> None:
    now = datetime.now(UTC)
    for minutes in (1, 2, 3):
        await audit(sessions, org, project_slug="marketing", received_at=now - timedelta(minutes=minutes))
    await audit(sessions, org, project_slug="old-thing", received_at=now - timedelta(days=10))
    await audit(sessions, org, project_slug="mapped-later")
    await audit(sessions, org, project_slug="frontend", outcome="routed", reason=None)
    await mapping(org, "mapped-later", await service(org, "Web App"))

    inbox = (await org.client.get("/api/v1/integrations/sentry/unmapped-projects")).json()
    assert [(p["slug"], p["events"]) for p in inbox] == [("marketing", 3)]
    assert inbox[0]["last_seen_at"].startswith(str((now - timedelta(minutes=1)).year))
    wide = (await org.client.get("/api/v1/integrations/sentry/unmapped-projects?days=30")).json()
    assert [p["slug"] for p in wide] == ["marketing", "old-thing"]
    error(await org.client.get("/api/v1/integrations/sentry/unmapped-projects?days=0"), 422, "days")


async def test_mappings_count_their_projects_deliveries_of_the_last_24_hours(
    org: Org, other: Org, sessions: async_sessionmaker[AsyncSession]
) -> None:
    now = datetime.now(UTC)
    web = await service(org, "Web App")
    await audit(sessions, org, project_slug="frontend", received_at=now - timedelta(hours=30))  # before it was mapped
    frontend = await mapping(org, "frontend", web)
    await mapping(org, "checkout", web)
    await mapping(org, "quiet", web)
    await audit(sessions, org, project_slug="frontend", received_at=now - timedelta(hours=2))  # unmapped then
    for hours in (0, 1, 23):
        received = now - timedelta(hours=hours)
        await audit(sessions, org, project_slug="frontend", outcome="routed", reason=None, received_at=received)
    await audit(sessions, org, project_slug="frontend", outcome="failed", reason="rejected")
    await audit(sessions, org, project_slug="quiet", received_at=now - timedelta(hours=25))  # outside the window
    await audit(sessions, org, project_slug="elsewhere")  # another project
    await audit(sessions, org, project_slug=None, reason="no_project")
    await audit(sessions, other, project_slug="frontend")  # another org's deliveries of the same slug
    await audit(sessions, other, project_slug="checkout")
    # A project renamed in Sentry: its deliveries now come under the new slug.
    await audit(sessions, org, project_slug="checkout")
    await audit(sessions, org, project_slug="checkout-web", outcome="routed", reason=None, renamed_from="checkout")
    async with sessions() as session, session.begin():
        await session.execute(
            update(SentryProjectMapping)
            .where(SentryProjectMapping.org_id == org.id, SentryProjectMapping.sentry_project_slug == "checkout")
            .values(renamed_to="checkout-web")
        )

    listed = (await org.client.get("/api/v1/integrations/sentry/mappings")).json()
    assert {m["sentry_project_slug"]: m["events_24h"] for m in listed} == {"checkout": 2, "frontend": 5, "quiet": 0}
    edited = await org.client.patch(f"/api/v1/integrations/sentry/mappings/{frontend['id']}", json={"active": False})
    assert edited.json()["events_24h"] == 5
    assert (await mapping(org, "elsewhere", web))["events_24h"] == 1
    await mapping(other, "frontend", await service(other, "Theirs"))
    theirs = (await other.client.get("/api/v1/integrations/sentry/mappings")).json()
    assert [(m["sentry_project_slug"], m["events_24h"]) for m in theirs] == [("frontend", 1)]


async def test_audit_and_incident_lists_filter_and_paginate(
    org: Org, other: Org, sessions: async_sessionmaker[AsyncSession]
) -> None:
    for i in range(5):
        await audit(sessions, org, project_slug=f"p{i}", outcome="routed" if i % 2 else "ignored")
    await audit(sessions, other, project_slug="theirs")
    first = (await org.client.get("/api/v1/integrations/sentry/audit?limit=2")).json()
    assert [r["project_slug"] for r in first["items"]] == ["p4", "p3"]
    second = (await org.client.get(first["next"])).json()
    third = (await org.client.get(second["next"])).json()
    assert [r["project_slug"] for r in second["items"] + third["items"]] == ["p2", "p1", "p0"]
    assert third["next"] is None
    routed = (await org.client.get("/api/v1/integrations/sentry/audit?outcome=routed")).json()
    assert [r["project_slug"] for r in routed["items"]] == ["p3", "p1"]
    assert set(routed["items"][0]) == {
        "delivery_id", "resource", "action", "project_slug", "outcome", "reason", "service_id", "mapping_id",
        "incident_id", "received_at", "processed_at", "replay_id", "previous_outcome", "previous_reason",
        "renamed_from", "flags", "error", "dlq_partition", "dlq_offset",
    }  # fmt: skip
    only = (await org.client.get("/api/v1/integrations/sentry/audit?project=p0")).json()
    assert [r["project_slug"] for r in only["items"]] == ["p0"]

    web = await service(org, "Web App")
    for i, status in enumerate(("open", "resolved", "open")):
        await incident(sessions, org, web, title=f"i{i}", status=status, event_count=1)
    listed = (await org.client.get(f"/api/v1/incidents?service_id={web}&status=open")).json()
    assert [i["title"] for i in listed["items"]] == ["i2", "i0"] and listed["next"] is None
    assert (await other.client.get("/api/v1/incidents")).json()["items"] == []


async def test_openapi_document_matches_the_routes(app: Starlette, org: Org) -> None:
    document = (await org.client.get("/api/v1/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, ops in document["paths"].items() for method in ops}
    served = set()
    for route in app.routes:
        if isinstance(route, Route) and route.path.startswith("/api/v1/") and route.path != "/api/v1/openapi.json":
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
            served |= {(path, m) for m in (route.methods or set()) if m != "HEAD"}
    assert documented == served
    for path, ops in document["paths"].items():
        for op in ops.values():
            for name in re.findall(r"\{(\w+)\}", path):
                assert any(p["name"] == name and p["in"] == "path" for p in op["parameters"])
            for response in op["responses"].values():
                ref = json.dumps(response)
                for name in re.findall(r"#/components/schemas/(\w+)", ref):
                    assert name in document["components"]["schemas"]
    required = {
        ("/api/v1/services", "GET"), ("/api/v1/services", "POST"), ("/api/v1/integrations/sentry", "GET"),
        ("/api/v1/integrations/sentry/mappings", "GET"), ("/api/v1/integrations/sentry/mappings", "POST"),
        ("/api/v1/integrations/sentry/mappings/{mapping_id}", "PATCH"),
        ("/api/v1/integrations/sentry/mappings/{mapping_id}", "DELETE"),
        ("/api/v1/integrations/sentry/unmapped-projects", "GET"), ("/api/v1/incidents", "GET"),
        ("/api/v1/integrations/sentry/audit", "GET"),
    }  # fmt: skip
    assert required <= documented


async def test_unknown_endpoint_is_a_json_404(org: Org) -> None:
    error(await org.client.get("/api/v1/nothing-here"), 404)


async def test_mapping_changes_notify_listeners_with_the_org(org: Org, migrated: Settings) -> None:
    web = await service(org, "Web App")
    conn = await psycopg.AsyncConnection.connect(libpq_url(migrated), autocommit=True)
    async with conn:
        await conn.execute(f"LISTEN {MAPPINGS_CHANNEL}")
        created = await mapping(org, "frontend", web)
        path = f"/api/v1/integrations/sentry/mappings/{created['id']}"
        await org.client.patch(path, json={"active": False})
        await org.client.delete(path)
        seen: list[dict[str, Any]] = []

        async def collect() -> None:
            async for notify in conn.notifies():
                payload = json.loads(notify.payload)
                if payload["org_id"] == org.id:
                    seen.append(payload)
                    if len(seen) == 3:
                        return

        await asyncio.wait_for(collect(), 10)
    assert [(n["op"], n["mapping_id"], n["sentry_project_slug"]) for n in seen] == [
        ("INSERT", created["id"], "frontend"),
        ("UPDATE", created["id"], "frontend"),
        ("DELETE", created["id"], "frontend"),
    ]


async def test_incident_timeline_lists_what_touched_it_and_hides_other_orgs(
    org: Org, other: Org, sessions: async_sessionmaker[AsyncSession]
) -> None:
    web = await service(org, "Web App")
    incident_id = await incident(sessions, org, web)
    now = datetime.now(UTC)
    async with sessions() as session, session.begin():
        for delivery, resource, action, change in (
            ("d1", "issue", "created", "opened"),
            ("d2", "comment", "created", "attached"),
            ("d3", "issue", "resolved", "resolved"),
        ):
            await session.execute(
                insert(IncidentEvent).values(
                    incident_id=incident_id, delivery_id=delivery, resource=resource, action=action,
                    change=change, received_at=now,
                )
            )  # fmt: skip
    timeline = (await org.client.get(f"/api/v1/incidents/{incident_id}/events")).json()
    assert [(e["delivery_id"], e["resource"], e["change"]) for e in timeline] == [
        ("d1", "issue", "opened"),
        ("d2", "comment", "attached"),
        ("d3", "issue", "resolved"),
    ]
    error(await other.client.get(f"/api/v1/incidents/{incident_id}/events"), 404)
    error(await org.client.get("/api/v1/incidents/987654321/events"), 404)
