"""The Deliveries and Incidents web pages, and the mappings page by keyboard alone, in a real
browser (Debian's Chromium via Playwright) against the admin service process on the real database.

Audit records, incidents and timelines are inserted with SQLAlchemy (what the writer would have
written); mappings are made through the pages and checked through the REST API."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Locator, Page, expect
from sqlalchemy import insert, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.models import AuditRecord, Incident, IncidentEvent, SentryProjectMapping
from shared.mappings import add_mapping, create_service
from shared.orgs import create_org
from tests.support.browser import shot, signed_in_page

pytestmark = pytest.mark.integration

XSS = "<img src=x onerror=alert(1)>"


class Data:
    """An org made directly in the database, and the rows the writer would have made for it."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self.org_id = 0
        self.slug = ""
        self.token = ""

    async def org(self, *services: str) -> dict[str, int]:
        self.slug = f"web-{uuid.uuid4().hex[:8]}"
        async with self.sessions() as session, session.begin():
            org = await create_org(session, self.slug)
            made = {name: (await create_service(session, org.org_id, name)).id for name in services}
        self.org_id, self.token = org.org_id, org.api_token
        return made

    async def mapping(self, slug: str, service_id: int, active: bool = True, **values: Any) -> None:
        async with self.sessions() as session, session.begin():
            view = await add_mapping(session, self.org_id, slug, service_id, active=active)
            if values:
                await session.execute(
                    update(SentryProjectMapping).where(SentryProjectMapping.id == view.id).values(**values)
                )

    async def audit(self, **values: Any) -> str:
        row: dict[str, Any] = {
            "delivery_id": uuid.uuid4().hex, "org_id": self.org_id, "org_slug": self.slug, "resource": "issue",
            "action": "created", "outcome": "ignored", "reason": "unmapped", "received_at": datetime.now(UTC),
            "raw_topic": "t", "raw_partition": 0, "raw_offset": 0, **values,
        }  # fmt: skip
        async with self.sessions() as session, session.begin():
            await session.execute(insert(AuditRecord).values(**row))
        delivery: str = row["delivery_id"]
        return delivery

    async def incident(self, service_id: int, **values: Any) -> int:
        now = datetime.now(UTC)
        row: dict[str, Any] = {
            "org_id": self.org_id, "service_id": service_id, "incident_key": f"issue:{uuid.uuid4().hex}",
            "title": "t", "first_seen_at": now, "last_seen_at": now, **values,
        }  # fmt: skip
        async with self.sessions() as session, session.begin():
            incident_id: int = (
                await session.execute(insert(Incident).values(**row).returning(Incident.id))
            ).scalar_one()
        return incident_id

    async def timeline(
        self, incident_id: int, service_id: int, project: str, *entries: tuple[str, str, str, dict[str, Any]]
    ) -> None:
        """Timeline entries (action, change, title, audit values) and each one's routed audit record."""
        for action, change, title, audit_values in entries:
            delivery = await self.audit(
                project_slug=project, action=action, outcome="routed", reason=None, incident_id=incident_id,
                service_id=service_id, title=title, **audit_values,
            )  # fmt: skip
            async with self.sessions() as session, session.begin():
                await session.execute(
                    insert(IncidentEvent).values(
                        incident_id=incident_id, delivery_id=delivery, project_slug=project, resource="issue",
                        action=action, change=change, title=title, level="error", received_at=datetime.now(UTC),
                    )
                )  # fmt: skip

    def client(self, admin_url: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=admin_url, headers={"Authorization": f"Bearer {self.token}"})


def row(page: Page, table: str, delivery: str) -> Locator:
    return page.locator(f'#{table} tr[data-delivery="{delivery}"]')


async def test_deliveries_say_what_happened_and_lead_to_incidents_and_mappings(
    browser: Browser, admin_url: str, sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    data = Data(sessions)
    services = await data.org("Web App", "Internal Tools")
    await data.mapping("frontend", services["Web App"], sentry_project_id="4501")
    await data.mapping("internal-tools", services["Internal Tools"], active=False)
    await data.mapping("old-name", services["Internal Tools"], renamed_to="new-name")
    now = datetime.now(UTC)
    issue = await data.incident(
        services["Web App"], title="TypeError: boom", level="error", status="resolved", event_count=1,
        sentry_issue_id="42", web_url="https://sentry.example/issues/42/", resolved_at=now,
    )  # fmt: skip
    await data.timeline(
        issue, services["Web App"], "frontend",
        ("created", "opened", "TypeError: boom", {}),
        ("resolved", "resolved", "TypeError: boom",
         {"replay_id": "rp-7", "previous_outcome": "ignored", "previous_reason": "unmapped"}),
    )  # fmt: skip
    old = await data.audit(project_slug="gone-project", received_at=now - timedelta(days=10))
    unmapped = await data.audit(project_slug="marketing-site")
    disabled = await data.audit(project_slug="internal-tools", reason="mapping_inactive")
    no_project = await data.audit(project_slug=None, reason="no_project")
    unsupported = await data.audit(project_slug=None, resource="installation", reason="unsupported_resource")
    failed = await data.audit(
        project_slug="frontend", outcome="failed", reason="rejected", dlq_partition=0, dlq_offset=7,
        error="ForeignKeyViolation: service 9 does not exist",
    )  # fmt: skip

    page = await signed_in_page(browser, admin_url, data.token)
    # The mappings page: Sentry project id, the rename's one-click update, the last event → deliveries
    frontend = page.locator('#mappings tr[data-slug="frontend"]')
    await expect(frontend).to_contain_text("Sentry project id 4501")
    await expect(frontend.locator("td.events")).to_have_text("3")  # created, resolved, failed: all within 24 h
    renamed = page.locator('#mappings tr[data-slug="old-name"]')
    await expect(renamed).to_contain_text("renamed in Sentry to new-name")
    await renamed.get_by_role("button", name="Update").click()
    await expect(page.locator('#mappings tr[data-slug="new-name"]')).not_to_contain_text("renamed in Sentry")
    await shot(page, tmp_path, "mappings")

    await frontend.get_by_role("link", name="Last event of frontend").click()
    await expect(page.get_by_role("heading", name="Deliveries")).to_be_visible()
    await expect(page.get_by_label("Project")).to_have_value("frontend")
    await expect(page.locator("#deliveries tbody tr")).to_have_count(3)  # created, resolved, failed
    await expect(row(page, "deliveries", failed)).to_contain_text("rejected by the database — see the error")
    await expect(row(page, "deliveries", failed)).to_contain_text("ForeignKeyViolation: service 9 does not exist")
    await expect(row(page, "deliveries", failed)).to_contain_text("partition 0, offset 7")

    # Everything, newest first, each reason in words
    await page.get_by_role("button", name="Clear").click()
    body = page.locator("#deliveries tbody tr")
    await expect(body).to_have_count(8)
    await expect(body.first).to_have_attribute("data-delivery", failed)
    await expect(row(page, "deliveries", unmapped)).to_contain_text("project not mapped — Map it…")
    await expect(row(page, "deliveries", disabled)).to_contain_text("mapping disabled — Enable…")
    await expect(row(page, "deliveries", no_project)).to_contain_text("no project in this webhook")
    await expect(row(page, "deliveries", unsupported)).to_contain_text("installation.created")
    await expect(row(page, "deliveries", unsupported)).to_contain_text("resource not supported")
    resolve = page.locator('#deliveries tr:has-text("issue.resolved")')
    await expect(resolve).to_contain_text("routed to Web App")
    await expect(resolve).to_contain_text("replay rp-7 (was ignored: unmapped)")
    await expect(row(page, "deliveries", old)).to_contain_text("gone-project")

    # Filters: outcome, reason, time range; then keyset paging with "Older"
    await page.get_by_label("Outcome").select_option("ignored")
    await page.get_by_label("Received").select_option("24h")
    await page.get_by_role("button", name="Filter").click()
    await expect(body).to_have_count(4)
    await expect(row(page, "deliveries", old)).to_have_count(0)
    await page.get_by_label("Reason").select_option("mapping_inactive")
    await page.get_by_role("button", name="Filter").click()
    await expect(body).to_have_count(1)
    await expect(body).to_have_attribute("data-delivery", disabled)
    await page.goto(admin_url + "/integrations/sentry/deliveries?limit=3")
    await expect(body).to_have_count(3)
    await page.get_by_role("button", name="Older").click()
    await expect(body).to_have_count(6)
    await page.get_by_role("button", name="Older").click()
    await expect(body).to_have_count(8)
    await expect(page.get_by_role("button", name="Older")).to_be_hidden()
    await shot(page, tmp_path, "deliveries")

    # The incident and its timeline after the resolve, the replay marked
    await resolve.get_by_role("link", name=f"Incident {issue}").click()
    await expect(page.get_by_role("heading", name="TypeError: boom")).to_be_visible()
    await expect(page.locator("#summary")).to_contain_text("resolved")
    await expect(page.get_by_role("link", name="Sentry issue 42")).to_have_attribute(
        "href", "https://sentry.example/issues/42/"
    )
    timeline = page.locator("#timeline tbody tr")
    await expect(timeline).to_have_count(2)
    await expect(timeline.nth(0)).to_contain_text("First occurrence — incident opened")
    await expect(timeline.nth(1)).to_contain_text("Resolved")
    await expect(timeline.nth(1)).to_contain_text("replay rp-7")
    await shot(page, tmp_path, "incident")

    # Incidents: open by default; resolved by the status filter
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Incidents").click()
    await expect(page.get_by_role("heading", name="Incidents")).to_be_visible()
    await expect(page.locator("#empty")).to_be_visible()
    await page.get_by_label("Service").select_option(label="Web App")
    await page.get_by_label("Status").select_option("resolved")
    await page.get_by_role("button", name="Filter").click()
    listed = page.locator(f'#incidents tr[data-incident="{issue}"]')
    await expect(listed).to_contain_text("TypeError: boom")
    await expect(listed).to_contain_text("error")
    await expect(listed.get_by_role("link", name="Sentry issue")).to_have_attribute(
        "href", "https://sentry.example/issues/42/"
    )
    await shot(page, tmp_path, "incidents")

    # "Enable…" goes to the disabled mapping's toggle; "Map it…" maps the unmapped project
    await page.goto(admin_url + "/integrations/sentry/deliveries")
    await row(page, "deliveries", disabled).get_by_role("link", name="Enable the mapping of internal-tools…").click()
    await expect(page.get_by_role("button", name="Enable internal-tools")).to_be_focused()
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Deliveries").click()
    await row(page, "deliveries", unmapped).get_by_role("link", name="Map marketing-site…").click()
    await expect(page.get_by_label("Sentry project slug")).to_have_value("marketing-site")
    await page.get_by_label("BlameTrail service").select_option(label="Web App")
    await page.get_by_role("button", name="Save").click()
    await expect(page.locator('#mappings tr[data-slug="marketing-site"]')).to_contain_text("Web App")
    async with data.client(admin_url) as client:
        made = (await client.get("/api/v1/integrations/sentry/mappings")).json()
    assert {(m["sentry_project_slug"], m["service_name"], m["active"]) for m in made} >= {
        ("marketing-site", "Web App", True), ("new-name", "Internal Tools", True)
    }  # fmt: skip
    assert data.token not in page.url
    await page.close()


async def test_values_from_webhooks_and_users_render_as_text_and_other_orgs_are_not_found(
    browser: Browser, admin_url: str, sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    other = Data(sessions)
    theirs = await other.incident((await other.org("Theirs"))["Theirs"], title="their incident")
    data = Data(sessions)
    services = await data.org(XSS)
    issue = await data.incident(services[XSS], title=XSS, level=XSS, web_url="javascript:alert(1)")
    await data.timeline(issue, services[XSS], XSS, ("created", "opened", XSS, {"replay_id": XSS}))
    failed = await data.audit(project_slug=XSS, outcome="failed", reason=XSS[:32], error=XSS, renamed_from=XSS)

    page = await signed_in_page(browser, admin_url, data.token)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    await page.goto(admin_url + "/integrations/sentry/deliveries")
    failed_row = row(page, "deliveries", failed)
    await expect(failed_row.get_by_text(XSS, exact=True)).to_have_count(2)  # the project, the error
    await expect(failed_row.get_by_role("cell", name=XSS, exact=True)).to_be_visible()
    await expect(failed_row).to_contain_text(f"project renamed from {XSS}")
    await page.goto(admin_url + "/incidents")
    await expect(page.get_by_role("link", name=XSS)).to_be_visible()
    await expect(page.locator("#incidents tbody").get_by_text(XSS)).to_have_count(3)  # title, service, level
    await page.get_by_role("link", name=XSS).click()
    await expect(page.get_by_role("heading", name=XSS)).to_be_visible()
    await expect(page.locator("#timeline")).to_contain_text(f"replay {XSS}")
    await expect(page.get_by_role("link", name="Sentry issue")).to_have_count(0)  # javascript: is no link
    await shot(page, tmp_path, "incident-xss")
    assert await page.locator("img").count() == 0
    assert dialogs == []

    # Another org's incident (and a malformed id) answer "not found"
    for path in (f"/incidents/{theirs}", "/incidents/abc"):
        await page.goto(admin_url + path)
        await expect(page.get_by_role("heading", name="Incident not found")).to_be_visible()
        await expect(page.locator("#message")).to_contain_text("not found: it does not exist in your organization")
        await expect(page.locator("#timeline-section")).to_be_hidden()
    await expect(page.get_by_text("their incident")).to_have_count(0)
    await page.close()


async def tab_to(page: Page, target: Locator, key: str = "Tab", limit: int = 40) -> None:
    """Press Tab (or ``key``) until ``target`` has the focus: it is reachable by keyboard."""
    for _ in range(limit):
        if await target.evaluate("node => node === document.activeElement"):
            return
        await page.keyboard.press(key)
    raise AssertionError(f"{target} not reached with {key} in {limit} presses")


async def test_mappings_by_keyboard_alone(
    browser: Browser, admin_url: str, sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    data = Data(sessions)
    await data.org("Web App", "Payments API")
    page = await browser.new_page()
    await page.goto(admin_url + "/")
    await tab_to(page, page.get_by_label("API token"))
    await page.keyboard.type(data.token)
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", name="Project Mappings")).to_be_visible()
    assert data.token not in page.url

    # Add
    await tab_to(page, page.get_by_role("button", name="Add Mapping"))
    await page.keyboard.press("Enter")
    await expect(page.get_by_label("Sentry project slug")).to_be_focused()
    await page.keyboard.type("frontend")
    await tab_to(page, page.get_by_label("BlameTrail service"))
    await tab_to(page, page.get_by_role("button", name="Save"))
    await page.keyboard.press("Enter")
    frontend = page.locator('#mappings tr[data-slug="frontend"]')
    await expect(frontend).to_contain_text("Web App")
    await expect(frontend.get_by_role("button", name="Edit frontend")).to_be_focused()

    # Edit: another service (arrow keys in the select)
    await page.keyboard.press("Enter")
    await expect(page.get_by_label("BlameTrail service")).to_be_focused()
    await page.keyboard.press("ArrowDown")
    await expect(page.get_by_label("BlameTrail service")).to_have_value(str(await service_id(data, admin_url)))
    await tab_to(page, page.get_by_role("button", name="Save"))
    await page.keyboard.press("Enter")
    await expect(frontend).to_contain_text("Payments API")
    await expect(page.locator("#message")).to_contain_text("existing incidents stay")

    # Disable, then Enable (the focus stays on the toggle)
    toggle = frontend.get_by_role("button", name="Disable frontend")
    await tab_to(page, toggle, "Shift+Tab")
    await page.keyboard.press("Enter")
    await expect(frontend).to_contain_text("Inactive")
    await expect(frontend.get_by_role("button", name="Enable frontend")).to_be_focused()
    await page.keyboard.press(" ")
    await expect(frontend).to_contain_text("Active")

    # Delete: the confirmation names the project and says incidents stay
    await tab_to(page, frontend.get_by_role("button", name="Delete frontend"))
    questions: list[str] = []

    async def accept(dialog: Any) -> None:
        questions.append(dialog.message)
        await dialog.accept()

    page.once("dialog", accept)
    await page.keyboard.press("Enter")
    await expect(frontend).to_have_count(0)
    assert '"frontend"' in questions[0] and "Existing incidents stay" in questions[0], questions
    await expect(page.get_by_role("button", name="Add Mapping")).to_be_focused()
    await shot(page, tmp_path, "mappings-keyboard")
    await page.close()


async def service_id(data: Data, admin_url: str) -> int:
    async with data.client(admin_url) as client:
        found: int = next(s["id"] for s in (await client.get("/api/v1/services")).json() if s["name"] == "Payments API")
    return found
