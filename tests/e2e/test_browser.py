"""The web pages over the real pipeline: webhooks go in through ingest, the router and writer
processes (the package's ``stack``) write what happened, and an admin finds it in a real browser
(Debian's Chromium via Playwright) on the admin service, a process on the same database.

Nothing is inserted behind the pipeline's back. Deliveries are found by the id ingest gives them
(``shared.events.delivery_id`` of org, resource and body); the pages are reloaded until the
pipeline's rows appear, with a deadline."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Locator, Page, expect

from shared.events import delivery_id
from tests.support import wait_until
from tests.support.browser import chromium, running_admin, shot, signed_in_page
from tests.support.metrics import scrape
from tests.support.sentry import issue_body
from tests.support.stack import Stack, post

pytestmark = pytest.mark.integration

DELIVERIES = "/integrations/sentry/deliveries"
WITHIN = 90  # seconds for the pipeline to write a delivery, on a loaded machine


@pytest.fixture(scope="module")
async def admin_url(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    async with running_admin(stack.settings, tmp_path_factory.mktemp("admin")) as url:
        yield url


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


async def send(stack: Stack, body: bytes) -> str:
    """Post an ``issue`` webhook through ingest; the delivery id it will be audited under."""
    response = await post(stack, body)
    assert response.status_code == 200, response.text
    return delivery_id(stack.org, "issue", body)


async def reload_until(page: Page, found: Locator, what: str) -> None:
    """Reload the page until ``found`` is on it: each time, once the table (or "No deliveries
    match") is drawn from the API, look for it; fail after WITHIN seconds."""
    drawn = page.locator("#deliveries tbody tr, #empty:visible").first

    async def shown() -> bool:
        await page.reload()
        await expect(drawn).to_be_visible()
        return await found.count() > 0

    await wait_until(shown, within=WITHIN, what=what)


def delivery(page: Page, delivery: str) -> Locator:
    return page.locator(f'#deliveries tr[data-delivery="{delivery}"]')


async def mapping_cache_entries(stack: Stack) -> float:
    return await scrape(stack.settings.router_metrics_port, "blametrail_router_mapping_cache_entries", stack.client)


async def test_webhooks_through_the_pipeline_on_the_pages(
    stack: Stack, browser: Browser, admin_url: str, tmp_path: Path
) -> None:
    issue, other_issue = (str(7_000_000_000 + uuid.uuid4().int % 10**9) for _ in range(2))
    unmapped = f"web-{uuid.uuid4().hex[:8]}"
    page = await signed_in_page(browser, admin_url, stack.api_token)

    # A mapped project's issue and an unmapped project's, through ingest
    created = await send(stack, issue_body(issue, project="payments-api"))
    ignored = await send(stack, issue_body(other_issue, project=unmapped))

    await page.goto(f"{admin_url}{DELIVERIES}?project=payments-api")
    routed_row = delivery(page, created)
    await reload_until(page, routed_row, "the mapped project's delivery on Deliveries")
    await expect(routed_row).to_have_attribute("data-outcome", "routed")
    await expect(routed_row).to_contain_text("issue.created")
    await expect(routed_row).to_contain_text("routed to Payments API")
    incident_link = routed_row.get_by_role("link", name=re.compile(r"^Incident [0-9]+$"))
    await expect(incident_link).to_be_visible()
    incident = await incident_link.inner_text()

    await page.goto(f"{admin_url}{DELIVERIES}?project={unmapped}")
    ignored_row = delivery(page, ignored)
    await reload_until(page, ignored_row, "the unmapped project's delivery on Deliveries")
    await expect(ignored_row).to_have_attribute("data-outcome", "ignored")
    await expect(ignored_row).to_contain_text("project not mapped — Map it…")
    await expect(ignored_row.get_by_role("link", name=re.compile("^Incident"))).to_have_count(0)
    await shot(page, tmp_path, "deliveries-unmapped")

    # Sentry resolves the issue: the delivery links to the incident, whose timeline shows the resolve
    resolved = await send(stack, issue_body(issue, project="payments-api", action="resolved"))
    await page.goto(f"{admin_url}{DELIVERIES}?project=payments-api")
    resolve_row = delivery(page, resolved)
    await reload_until(page, resolve_row, "the resolve on Deliveries")
    await expect(resolve_row).to_contain_text("issue.resolved")
    await expect(resolve_row).to_contain_text("routed to Payments API")
    await shot(page, tmp_path, "deliveries")
    await resolve_row.get_by_role("link", name=incident, exact=True).click()  # the same incident
    await expect(page.get_by_role("heading", name="ReferenceError: blooopy is not defined")).to_be_visible()
    await expect(page.locator("#summary")).to_contain_text("resolved")
    await expect(page.locator("#summary")).to_contain_text("Payments API")
    timeline = page.locator("#timeline tbody tr")
    await expect(timeline).to_have_count(2)
    await expect(timeline.nth(0)).to_contain_text("First occurrence — incident opened")
    await expect(timeline.nth(1)).to_contain_text("Resolved")
    await shot(page, tmp_path, "incident")

    # "Map it…" on the unmapped delivery maps the project through the page
    await page.goto(f"{admin_url}{DELIVERIES}?project={unmapped}")
    entries = await mapping_cache_entries(stack)
    await delivery(page, ignored).get_by_role("link", name=f"Map {unmapped}…").click()
    await expect(page.get_by_label("Sentry project slug")).to_have_value(unmapped)
    await page.get_by_label("BlameTrail service").select_option(label="Web App")
    await page.get_by_role("button", name="Save").click()
    mapped_row = page.locator(f'#mappings tr[data-slug="{unmapped}"]')
    await expect(mapped_row).to_contain_text("Web App")
    await expect(page.locator(f'#unmapped tr[data-slug="{unmapped}"]')).to_have_count(0)

    # Once the router has the new mapping (its NOTIFY reloaded the cache), the next delivery is routed
    async def router_has_it() -> bool:
        return await mapping_cache_entries(stack) > entries

    await wait_until(router_has_it, within=WITHIN, what="the router's mapping cache holding the new mapping")
    follow_up = await send(stack, issue_body(other_issue, project=unmapped, count=2))
    await page.goto(f"{admin_url}{DELIVERIES}?project={unmapped}")
    follow_row = delivery(page, follow_up)
    await reload_until(page, follow_row, "the next delivery of the newly mapped project")
    await expect(follow_row).to_have_attribute("data-outcome", "routed")
    await expect(follow_row).to_contain_text("routed to Web App")
    await expect(follow_row.get_by_role("link", name=re.compile(r"^Incident [0-9]+$"))).to_be_visible()
    await expect(delivery(page, ignored)).to_contain_text("project not mapped")  # the earlier one stays as it was
    await shot(page, tmp_path, "deliveries-mapped")

    # The mappings page counts the project's deliveries of the last 24 h: the ignored one and the routed one
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Mappings").click()
    await expect(mapped_row.locator("td.events")).to_have_text("2")
    payments = page.locator('#mappings tr[data-slug="payments-api"] td.events')
    assert int(await payments.inner_text()) >= 2  # created and resolved (other tests share the project)
    await shot(page, tmp_path, "mappings")
    assert stack.api_token not in page.url
    await page.close()
