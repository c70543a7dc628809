"""A raw replay through the live router: a project mapped after the fact routes, with the replay id."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from router.consumer import Router
from shared import events
from shared.mappings import add_mapping
from shared.settings import Settings
from shared.topics import Topics
from tests.replay.support import org_with_services, own_settings, produce, raw, replay
from tests.support import wait_until
from tests.support.kafka import TopicReader
from tests.support.sentry import issue_body

pytestmark = pytest.mark.integration


async def test_a_replayed_delivery_is_routed_with_todays_mapping(
    topics: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    settings = await own_settings(topics, "router")
    t = Topics.from_settings(settings)
    slug, org_id, services = await org_with_services(sessions, "Payments API")
    service = services["Payments API"]
    await produce(settings, [raw(t, slug, issue_body("9001", project="payments-worker"), minute=1)])

    router = Router(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(router.run(stop))
    try:
        async with TopicReader(settings.kafka_bootstrap, [t.routed, t.ignored]) as reader:
            await reader.wait_for_count(1, [t.ignored])
            [first] = reader.events(t.ignored)
            assert (first["reason"], first["replay_id"]) == ("unmapped", None)

            async with sessions() as session, session.begin():
                await add_mapping(session, org_id, "payments-worker", service)
            await wait_until(lambda: _mapped(router, slug), within=30, what="the router's cache knowing the mapping")
            summary = await replay(settings, "raw", 0, 10, org=slug, project="payments-worker")
            assert summary.counts.republished == 1

            await reader.wait_for_count(1, [t.routed])
            [record] = reader.on(t.routed)
            assert record.headers[events.H_REPLAY_ID] == summary.options.replay_id
            routed = record.json()
            assert (routed["service_id"], routed["replay_id"]) == (service, summary.options.replay_id)
            assert routed["delivery_id"] == first["delivery_id"]
            assert await wait_until(lambda: _alive(task), within=1, what="the router running")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def _alive(task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()
    return True


async def _mapped(router: Router, org: str) -> bool:
    mappings = router.cache.lookup(org)
    return mappings is not None and mappings.get("payments-worker") is not None
