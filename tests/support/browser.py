"""The admin web pages in a real browser: the admin service as a process, Debian's Chromium driven
by Playwright, sign-in and screenshots. Used by the page tests (tests/admin) and the end-to-end
browser test (tests/e2e/test_browser.py)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from shared.settings import Settings
from tests.support import ServiceProcess, free_port, settings_env, wait_until

CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@contextlib.asynccontextmanager
async def running_admin(settings: Settings, log_dir: Path) -> AsyncIterator[str]:
    """``blametrail admin`` as a process on ``settings``' database; its base URL once /healthz answers."""
    port = free_port()
    process = ServiceProcess("admin", settings_env(settings, BLAMETRAIL_ADMIN_PORT=str(port)), log_dir)
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


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Debian's Chromium (scripts/test.sh installs it), headless, driven by Playwright."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("Chromium is not installed: scripts/test.sh installs Debian's chromium package")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            await browser.close()


async def signed_in_page(browser: Browser, admin_url: str, token: str) -> Page:
    """A new tab signed in with the org's API token, on the Project Mappings page."""
    page = await browser.new_page()
    await page.goto(admin_url + "/")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Continue").click()
    await expect(page.get_by_role("heading", name="Project Mappings")).to_be_visible()
    return page


async def shot(page: Page, directory: Path, name: str) -> None:
    """A full-page screenshot ``<directory>/<name>.png`` (the test's output directory), its path printed."""
    path = directory / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
