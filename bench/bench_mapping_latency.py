"""How long a mapping change takes to affect routing: commit → NOTIFY → the router's cache reloaded.

Creates ``--orgs`` organizations with ``--mappings`` mappings each (a realistic table to reload),
starts the router's MappingCache, then toggles one mapping ``--changes`` times and measures, for
each change, the time from the committing transaction's end until ``cache.lookup`` shows it.

    BLAMETRAIL_DATABASE_URL=postgresql+psycopg://... python -m bench.bench_mapping_latency
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from sqlalchemy import insert, update

from router.cache import MappingCache
from router.routing import OrgMappings
from shared.db.conninfo import libpq_url
from shared.db.migrate import upgrade
from shared.db.models import Organization, SentryProjectMapping, Service
from shared.db.session import create_engine, sessionmaker
from shared.settings import Settings


async def main(orgs: int, per_org: int, changes: int) -> None:
    settings = Settings()
    upgrade(settings)
    engine = create_engine(settings)
    sessions = sessionmaker(engine)
    run = uuid.uuid4().hex[:6]
    async with sessions() as session, session.begin():
        org_ids = list(
            await session.scalars(
                insert(Organization).returning(Organization.id),
                [{"slug": f"bench-{run}-{i}", "name": "bench"} for i in range(orgs)],
            )
        )
        service_ids = list(
            await session.scalars(
                insert(Service).returning(Service.id), [{"org_id": o, "name": "svc"} for o in org_ids]
            )
        )
        await session.execute(
            insert(SentryProjectMapping),
            [
                {"org_id": o, "service_id": s, "sentry_project_slug": f"p{j}", "active": True}
                for o, s in zip(org_ids, service_ids, strict=True)
                for j in range(per_org)
            ],
        )
    cache = MappingCache(sessions, libpq_url(settings), refresh_seconds=3600)
    started = time.perf_counter()
    await cache.start()
    await cache.listening.wait()
    print(f"cache: {orgs * per_org} mappings of {orgs} orgs loaded in {time.perf_counter() - started:.3f}s")
    target_org = f"bench-{run}-0"
    latencies = []
    for i in range(changes):
        active = i % 2 == 1
        async with sessions() as session, session.begin():
            await session.execute(
                update(SentryProjectMapping)
                .where(SentryProjectMapping.org_id == org_ids[0], SentryProjectMapping.sentry_project_slug == "p0")
                .values(active=active)
            )
        committed = time.perf_counter()
        deadline = committed + 10

        def applied(active: bool = active) -> bool:
            entry = (cache.lookup(target_org) or OrgMappings()).get("p0")
            return entry is not None and entry.active == active

        while not applied():
            if time.perf_counter() > deadline:
                raise SystemExit(f"change {i} not applied within 10 s")
            await asyncio.sleep(0.001)
        latencies.append(time.perf_counter() - committed)
    await cache.stop()
    await engine.dispose()
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    print(
        f"mapping change → routing, {changes} changes: p50 {statistics.median(ms):.1f} ms, "
        f"p95 {ms[int(len(ms) * 0.95) - 1]:.1f} ms, max {ms[-1]:.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--mappings", type=int, default=10, help="mappings per org")
    parser.add_argument("--changes", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main(args.orgs, args.mappings, args.changes))
