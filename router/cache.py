"""The router's mapping cache: the whole mappings table in memory, refreshed on NOTIFY and on a timer.

Lookups never touch the database. A LISTEN connection (``shared.db.listen``, reconnecting with
backoff) triggers a reload whenever a mapping or an org changes; a periodic reload covers lost
notifications.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from router.routing import MappingEntry, OrgMappings
from shared import metrics
from shared.db.listen import Listener
from shared.db.models import MAPPINGS_CHANNEL, Organization, SentryIssueProject, SentryProjectMapping
from shared.sentry import ProjectRef

log = logging.getLogger("blametrail.router.cache")


class MappingCache:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], libpq_url: str, refresh_seconds: float) -> None:
        self._sessions = sessions
        self._refresh_seconds = refresh_seconds
        self._orgs: dict[str, OrgMappings] = {}
        self._loaded_at = 0.0
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener = Listener(libpq_url, MAPPINGS_CHANNEL, lambda _payload: self._dirty.set(), name="mapping")
        self.listening = self._listener.listening

    def lookup(self, org: str) -> OrgMappings | None:
        """The org's mappings, or None when the org does not exist."""
        return self._orgs.get(org)

    async def lookup_new(self, org: str, min_interval: float = 1.0) -> OrgMappings | None:
        """:meth:`lookup`, reloading first when the org is unknown and the last reload is older than
        ``min_interval``: an org created a moment ago (its NOTIFY still on the way) is found at once.
        Ingest refuses unknown orgs, so an unknown org here is rare; the interval bounds the cost."""
        found = self._orgs.get(org)
        if found is None and self.age_seconds >= min_interval:
            await self.load("unknown_org")
            found = self._orgs.get(org)
        return found

    @property
    def age_seconds(self) -> float:
        return time.monotonic() - self._loaded_at

    async def load(self, trigger: str = "start") -> None:
        started = time.perf_counter()
        entries: dict[str, list[MappingEntry]] = {}
        async with self._sessions() as session:
            for (slug,) in await session.execute(select(Organization.slug)):
                entries[slug] = []
            rows = await session.execute(
                select(
                    Organization.slug,
                    SentryProjectMapping.id,
                    SentryProjectMapping.service_id,
                    SentryProjectMapping.active,
                    SentryProjectMapping.sentry_project_slug,
                    SentryProjectMapping.sentry_project_id,
                    SentryProjectMapping.renamed_to,
                ).join(Organization, Organization.id == SentryProjectMapping.org_id)
            )
            for org, mapping_id, service_id, active, slug, project_id, renamed_to in rows:
                entries.setdefault(org, []).append(
                    MappingEntry(mapping_id, service_id, active, slug, project_id, renamed_to)
                )
        self._orgs = {org: OrgMappings.of(mappings) for org, mappings in entries.items()}
        self._loaded_at = time.monotonic()
        metrics.MAPPING_CACHE_ENTRIES.set(sum(len(m) for m in entries.values()))
        metrics.MAPPING_CACHE_REFRESHES.labels(trigger=trigger).inc()
        metrics.MAPPING_CACHE_REFRESH_SECONDS.observe(time.perf_counter() - started)

    async def start(self) -> None:
        await self.load()
        self._tasks = [
            asyncio.create_task(self._listener.run(), name="mapping-listen"),
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


class IssueProjects:
    """The issue → project index (``sentry_issue_projects``, written by the incident writer), for
    deliveries that name only a Sentry issue (seer). Pairs found are kept in a bounded LRU: an
    issue's project never changes. Not found is not remembered: the pair may be learned any moment.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], size: int = 10_000) -> None:
        self._sessions = sessions
        self._size = size
        self._found: OrderedDict[tuple[str, str], ProjectRef] = OrderedDict()

    async def lookup(self, org: str, sentry_issue_id: str) -> ProjectRef | None:
        key = (org, sentry_issue_id)
        found = self._found.get(key)
        if found is not None:
            self._found.move_to_end(key)
            return found
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(SentryIssueProject.project_slug, SentryIssueProject.sentry_project_id)
                    .join(Organization, Organization.id == SentryIssueProject.org_id)
                    .where(Organization.slug == org, SentryIssueProject.sentry_issue_id == sentry_issue_id)
                )
            ).first()
        if row is None:
            return None
        project = ProjectRef(slug=row.project_slug, id=row.sentry_project_id)
        self._found[key] = project
        if len(self._found) > self._size:
            self._found.popitem(last=False)
        return project
