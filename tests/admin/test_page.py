"""The Project Mappings web page in a real browser (Debian's Chromium, driven by Playwright),
against the admin service running as a process on the real database."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.models import AuditRecord
from shared.mappings import create_service
from shared.orgs import create_org
from shared.settings import Settings
from tests.support import ServiceProcess, free_port, settings_env, wait_until

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
async def admin_url(migrated: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    port = free_port()
    process = ServiceProcess(
        "admin", settings_env(migrated, BLAMETRAIL_ADMIN_PORT=str(port)), tmp_path_factory.mktemp("admin")
    )
    url = f"http://127.0.0.1:{port}"

    async def up() -> bool:
        assert process.alive(), process.output()
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(url + "/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    try:
        await wait_until(up, within=30, what="admin /healthz")
        yield url
    finally:
        process.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("Chromium is not installed: scripts/test.sh installs Debian's chromium package")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        await browser.close()


async def signed_in_page(browser: Browser, admin_url: str, token: str) -> Page:
    page = await browser.new_page()
    await page.goto(admin_url + "/")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Continue").click()
    await expect(page.get_by_role("heading", name="Project Mappings")).to_be_visible()
    return page


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

    await page.screenshot(path=str(tmp_path / "mappings.png"), full_page=True)

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
