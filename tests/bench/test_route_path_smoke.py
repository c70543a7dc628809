"""``bench.route_path`` at a tiny size against the session's database: the harness still works, and it
measures the router's real work (80 % of the mix routed to the mapped project, 20 % ignored)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bench import route_path
from shared.mappings import add_mapping, create_service
from shared.orgs import create_org
from shared.settings import Settings
from tests.support.metrics import local


async def test_route_path_measures_the_routers_work(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession], unique_slug: str
) -> None:
    async with sessions() as session, session.begin():
        org = await create_org(session, unique_slug)
        service = await create_service(session, org.org_id, "Payments")
        await add_mapping(session, org.org_id, route_path.PROJECT, service.id)
    routed = local("blametrail_router_events_total", outcome="routed", reason="")
    ignored = local("blametrail_router_events_total", outcome="ignored", reason="unmapped")

    result = await route_path.measure(migrated, 200, 50, rounds=2, org=unique_slug)

    assert result["dead_lettered"] == 0 and result["outputs_per_event"] == 1.0, result
    # the warm-up (the first four batches: here all of them) and two passes
    assert local("blametrail_router_events_total", outcome="routed", reason="") - routed == 3 * 160
    assert local("blametrail_router_events_total", outcome="ignored", reason="unmapped") - ignored == 3 * 40
    assert result["cpu_us_per_event"] > 0 and result["relative_to_reference"] > 0, result
    assert len(result["cpu_us_per_event_each_pass"]) == len(result["relative_each_pass"]) == 2
