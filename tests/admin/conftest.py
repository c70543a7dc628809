"""The admin app on the test database, orgs with API clients of it, and the error-shape assertion;
for the page tests, the admin service as a process and a browser (tests/support/browser.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette

from admin.app import create_app
from shared.orgs import create_org
from shared.settings import Settings
from tests.support.browser import chromium, running_admin


@pytest.fixture(scope="module")
async def admin_url(migrated: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """The admin service as a process on the test database, for the page tests."""
    async with running_admin(migrated, tmp_path_factory.mktemp("admin")) as url:
        yield url


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


@dataclass
class Org:
    slug: str
    id: int
    client: httpx.AsyncClient


OrgMaker = Callable[[], Awaitable[Org]]


@pytest.fixture(scope="module")
async def app(migrated: Settings) -> AsyncIterator[Starlette]:
    app = create_app(migrated)
    yield app
    await app.state.engine.dispose()


async def new_org(app: Starlette, sessions: async_sessionmaker[AsyncSession]) -> Org:
    slug = f"org-{uuid.uuid4().hex[:10]}"
    async with sessions() as session, session.begin():
        created = await create_org(session, slug)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://admin",
        headers={"Authorization": f"Bearer {created.api_token}"},
    )
    return Org(slug, created.org_id, client)


@pytest.fixture
async def orgs(app: Starlette, sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[OrgMaker]:
    """Makes new orgs with clients, closed after the test."""
    made: list[Org] = []

    async def make() -> Org:
        made.append(await new_org(app, sessions))
        return made[-1]

    yield make
    for org in made:
        await org.client.aclose()


@pytest.fixture
async def org(orgs: OrgMaker) -> Org:
    return await orgs()


@pytest.fixture
async def other(orgs: OrgMaker) -> Org:
    """A second org, for checks that one org cannot see or touch another's data."""
    return await orgs()


def error(response: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    """The answer is ``status`` with the API's JSON error shape ``{"error": {code, message, field?}}``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    detail: dict[str, Any] = body["error"]
    assert {"code", "message"} <= set(detail) <= {"code", "message", "field"}, detail
    assert isinstance(detail["code"], str) and detail["code"] and isinstance(detail["message"], str), detail
    if field is not None:
        assert detail.get("field") == field, detail
    return detail
