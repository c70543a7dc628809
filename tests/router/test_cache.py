"""The mapping cache against the real database: a mapping's NOTIFY re-reads its org only, and what
the cache then holds is exactly what reading everything gives."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from router.cache import MappingCache, _changed_org
from shared.db.conninfo import libpq_url
from shared.mappings import add_mapping, create_service, delete_mapping, edit_mapping
from shared.orgs import create_org
from shared.settings import Settings
from tests.support import wait_until
from tests.support.metrics import local

pytestmark = pytest.mark.integration

Sessions = async_sessionmaker[AsyncSession]


async def org_with_mappings(sessions: Sessions, *projects: str) -> tuple[str, int, int, dict[str, int]]:
    """A new org with one service and ``projects`` mapped to it: (slug, org id, service id, mapping ids)."""
    slug = f"org-{uuid.uuid4().hex[:10]}"
    async with sessions() as session, session.begin():
        org = await create_org(session, slug)
        service = (await create_service(session, org.org_id, "Service")).id
        mappings = {p: (await add_mapping(session, org.org_id, p, service)).id for p in projects}
    return slug, org.org_id, service, mappings


@contextlib.asynccontextmanager
async def full_read(migrated: Settings, sessions: Sessions) -> AsyncIterator[MappingCache]:
    cache = MappingCache(sessions, libpq_url(migrated), refresh_seconds=3600)
    await cache.load()
    yield cache


async def test_load_orgs_gives_what_reading_everything_gives(migrated: Settings, sessions: Sessions) -> None:
    a, a_id, a_service, a_maps = await org_with_mappings(sessions, "frontend", "payments-api")
    b, _, _, _ = await org_with_mappings(sessions, "frontend")
    gone, gone_id, _, _ = await org_with_mappings(sessions, "email-worker")
    cache = MappingCache(sessions, libpq_url(migrated), refresh_seconds=3600)
    await cache.load()
    b_before = cache.lookup(b)
    async with sessions() as session, session.begin():
        await edit_mapping(session, a_id, a_maps["frontend"], active=False, sentry_project_id="4505")
        await delete_mapping(session, a_id, a_maps["payments-api"])
        await add_mapping(session, a_id, "checkout", a_service, sentry_project_id="4506")
        await session.execute(text("DELETE FROM organizations WHERE id = :id"), {"id": gone_id})

    await cache.load_orgs({a_id, gone_id})

    async with full_read(migrated, sessions) as fresh:
        assert cache.lookup(a) == fresh.lookup(a)
        assert cache.lookup(gone) is None and fresh.lookup(gone) is None
        assert cache._orgs == fresh._orgs and cache._slugs == fresh._slugs
        assert cache._entries == fresh._entries == local("blametrail_router_mapping_cache_entries")
    assert cache.lookup(b) is b_before  # an org not named is not read again
    a_now = cache.lookup(a)
    assert a_now is not None and a_now.size == 2
    frontend = a_now.get("frontend")
    assert frontend is not None and (frontend.active, frontend.project_id) == (False, "4505")
    assert a_now.by_id["4506"].slug == "checkout" and a_now.get("payments-api") is None


async def test_a_mapping_notify_rereads_its_org_only(migrated: Settings, sessions: Sessions) -> None:
    a, a_id, _, a_maps = await org_with_mappings(sessions, "frontend")
    b, _, _, _ = await org_with_mappings(sessions, "frontend")
    cache = MappingCache(sessions, libpq_url(migrated), refresh_seconds=3600)
    notified = local("blametrail_router_mapping_cache_refreshes_total", trigger="notify")
    await cache.start()
    try:
        # Connected: the listener asks for a read of everything once; wait for it to be done.
        await wait_until(
            lambda: _above("notify", notified), within=30, what="the read of everything after LISTEN connected"
        )
        b_before = cache.lookup(b)
        notified = local("blametrail_router_mapping_cache_refreshes_total", trigger="notify")
        async with sessions() as session, session.begin():
            await edit_mapping(session, a_id, a_maps["frontend"], active=False)

        async def applied() -> bool:
            mappings = cache.lookup(a)
            found = mappings.get("frontend") if mappings is not None else None
            return found is not None and not found.active

        await wait_until(applied, within=30, what="the change in the cache")
        await wait_until(lambda: _above("notify", notified), within=30, what="the refresh counted")
        assert cache.lookup(b) is b_before
        async with full_read(migrated, sessions) as fresh:
            assert cache._orgs == fresh._orgs
    finally:
        await cache.stop()


async def _above(trigger: str, before: float) -> bool:
    return local("blametrail_router_mapping_cache_refreshes_total", trigger=trigger) > before


def test_only_a_mappings_notification_names_an_org() -> None:
    assert _changed_org('{"op": "UPDATE", "org_id": 7, "mapping_id": 3, "sentry_project_slug": "x"}') == 7
    assert _changed_org('{"op": "INSERT", "table": "organizations"}') is None
    assert _changed_org(None) is None
    assert _changed_org("") is None
    assert _changed_org("not json") is None
    assert _changed_org('{"org_id": "7", "mapping_id": 3}') is None
