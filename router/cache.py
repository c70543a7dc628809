"""The router's mapping cache: the whole mappings table in memory, refreshed on NOTIFY and on a timer.

Lookups never touch the database. A LISTEN connection (reconnecting with backoff) triggers a
reload whenever a mapping changes; a periodic reload covers lost notifications.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import psycopg
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from router.routing import MappingEntry
from shared import metrics
from shared.db.models import MAPPINGS_CHANNEL, Organization, SentryProjectMapping

log = logging.getLogger("blametrail.router.cache")

OrgMappings = dict[str, MappingEntry]


class MappingCache:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], libpq_url: str, refresh_seconds: float) -> None:
        self._sessions = sessions
        self._libpq_url = libpq_url
        self._refresh_seconds = refresh_seconds
        self._orgs: dict[str, OrgMappings] = {}
        self._loaded_at = 0.0
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = asyncio.Event()

    def lookup(self, org: str) -> Mapping[str, MappingEntry] | None:
        """The org's mappings by project slug, or None when the org does not exist."""
        return self._orgs.get(org)

    @property
    def age_seconds(self) -> float:
        return time.monotonic() - self._loaded_at

    async def load(self, trigger: str = "start") -> None:
        started = time.perf_counter()
        orgs: dict[str, OrgMappings] = {}
        async with self._sessions() as session:
            for (slug,) in await session.execute(select(Organization.slug)):
                orgs[slug] = {}
            rows = await session.execute(
                select(
                    Organization.slug,
                    SentryProjectMapping.sentry_project_slug,
                    SentryProjectMapping.id,
                    SentryProjectMapping.service_id,
                    SentryProjectMapping.active,
                ).join(Organization, Organization.id == SentryProjectMapping.org_id)
            )
            for org, project, mapping_id, service_id, active in rows:
                orgs.setdefault(org, {})[project] = MappingEntry(mapping_id, service_id, active)
        self._orgs = orgs
        self._loaded_at = time.monotonic()
        metrics.MAPPING_CACHE_ENTRIES.set(sum(len(m) for m in orgs.values()))
        metrics.MAPPING_CACHE_REFRESHES.labels(trigger=trigger).inc()
        metrics.MAPPING_CACHE_REFRESH_SECONDS.observe(time.perf_counter() - started)

    async def start(self) -> None:
        await self.load()
        self._tasks = [
            asyncio.create_task(self._listen(), name="mapping-listen"),
            asyncio.create_task(self._refresher(), name="mapping-refresh"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _refresher(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), self._refresh_seconds)
                trigger = "notify"
            except TimeoutError:
                trigger = "timer"
            self._dirty.clear()
            try:
                await self.load(trigger)
            except Exception:
                log.exception("mapping cache refresh failed; keeping the previous mappings")
                await asyncio.sleep(1)
            metrics.MAPPING_CACHE_AGE.set(self.age_seconds)

    async def _listen(self) -> None:
        backoff = 0.5
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._libpq_url, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {MAPPINGS_CHANNEL}")
                    # Changes made while we were not listening: reload once now.
                    self._dirty.set()
                    self.listening.set()
                    backoff = 0.5
                    async for _ in conn.notifies():
                        self._dirty.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening.clear()
                log.warning("mapping LISTEN connection lost (%r); reconnecting in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)
