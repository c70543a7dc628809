"""The Project Mappings web page in a real browser (Debian's Chromium, driven by Playwright),
against the admin service running as a process on the real database (the ``admin_url`` and
``browser`` fixtures are in tests/admin/conftest.py, built on tests/support/browser.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from playwright.async_api import Browser, expect
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.models import AuditRecord
from shared.mappings import create_service
from shared.orgs import create_org
from tests.support.browser import shot, signed_in_page

pytestmark = pytest.mark.integration


async def test_admin_manages_mappings_in_the_browser(
    browser: Browser, admin_url: str, sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    slug = f"web-{uuid.uuid4().hex[:8]}"
    async with sessions() as session, session.begin():
        org = await create_org(session, slug)
        for name in ("Web App", "Payments API"):
            await create_service(session, org.org_id, name)
        await session.execute(
            insert(AuditRecord).values(
                delivery_id=uuid.uuid4().hex, org_id=org.org_id, org_slug=slug, project_slug="marketing-site",
                resource="issue", action="created", outcome="ignored", reason="unmapped",
                received_at=datetime.now(UTC), raw_topic="t", raw_partition=0, raw_offset=0,
            )
        )  # fmt: skip
    page = await signed_in_page(browser, admin_url, org.api_token)
    await expect(page.locator("#webhook-url")).to_contain_text(f"/webhooks/sentry/{slug}")
    await expect(page.locator("#empty")).to_be_visible()

    # Add a mapping
    await page.get_by_role("button", name="Add Mapping").click()
    await page.get_by_label("Sentry project slug").fill("frontend")
    await page.get_by_label("BlameTrail service").select_option(label="Web App")
    await page.get_by_role("button", name="Save").click()
    frontend = page.locator('#mappings tr[data-slug="frontend"]')
    await expect(frontend).to_contain_text("Web App")
    await expect(page.locator("#mapping-form")).to_be_hidden()
    await expect(frontend).to_contain_text("Active")

    # Disable keeps the mapping; enable restores it
    await frontend.get_by_role("button", name="Disable").click()
    await expect(frontend).to_contain_text("Inactive")
    await expect(frontend).to_contain_text("Web App")
    await frontend.get_by_role("button", name="Enable").click()
    await expect(frontend).to_contain_text("Active")

    # Edit: another service
    await frontend.get_by_role("button", name="Edit").click()
    await page.get_by_label("BlameTrail service").select_option(label="Payments API")
    await page.get_by_role("button", name="Save").click()
    await expect(frontend).to_contain_text("Payments API")
    await expect(page.locator("#message")).to_contain_text("existing incidents stay")

    # A duplicate shows the API's error
    await page.get_by_role("button", name="Add Mapping").click()
    await page.get_by_label("Sentry project slug").fill("frontend")
    await page.get_by_role("button", name="Save").click()
    await expect(page.locator("#message")).to_contain_text("already mapped")
    await page.get_by_role("button", name="Cancel").click()

    # The unmapped inbox maps a project in two clicks
    inbox_row = page.locator('#unmapped tr[data-slug="marketing-site"]')
    await expect(inbox_row).to_contain_text("1")
    await inbox_row.get_by_role("button", name="Map").click()
    await expect(page.get_by_label("Sentry project slug")).to_have_value("marketing-site")
    await page.get_by_label("BlameTrail service").select_option(label="Web App")
    await page.get_by_role("button", name="Save").click()
    await expect(page.locator('#mappings tr[data-slug="marketing-site"]')).to_contain_text("Web App")
    await expect(inbox_row).to_have_count(0)

    await shot(page, tmp_path, "mappings")

    # Delete, after confirming
    page.once("dialog", lambda dialog: dialog.accept())
    await frontend.get_by_role("button", name="Delete").click()
    await expect(frontend).to_have_count(0)
    await page.close()


async def test_a_bad_token_returns_to_sign_in(browser: Browser, admin_url: str) -> None:
    page = await browser.new_page()
    await page.goto(admin_url + "/")
    await page.get_by_label("API token").fill("btk_not-a-real-token")
    await page.get_by_role("button", name="Continue").click()
    await expect(page.get_by_label("API token")).to_be_visible()
    await page.close()
