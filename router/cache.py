"""The router's mapping cache: the whole mappings table in memory, refreshed on NOTIFY and on a timer.

Lookups never touch the database. A LISTEN connection (``shared.db.listen``, reconnecting with
backoff) triggers a reload whenever a mapping or an org changes; a periodic reload covers lost
notifications.

A mapping's notification names its org: only the orgs named are read again (milliseconds, where
reading every mapping takes seconds at 100,000 mappings). Anything else — an org created, renamed or
deleted, a (re)connected LISTEN, many orgs at once, or no full read for ``refresh_seconds`` — reads
everything. Reads are one plain query (only the columns the router needs, compiled once, run on the
session's psycopg connection, rows taken in chunks), and an org whose mappings did not change keeps
its cached object: a read of everything peaks at little more than one copy of the cache. Reads are
serialised, so a slower read never replaces a newer one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from itertools import islice
from typing import Any
from typing import cast as typed

import orjson
import psycopg
from sqlalchemy import ARRAY, BigInteger, any_, bindparam, select
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from router.routing import MappingEntry, OrgMappings
from shared import metrics
from shared.db.conninfo import MAPPINGS_CHANNEL
from shared.db.listen import Listener
from shared.db.models import Organization, SentryIssueProject, SentryProjectMapping
from shared.sentry import ProjectRef

log = logging.getLogger("blametrail.router.cache")

# More orgs than this named by the notifications since the last read: read everything instead.
MAX_PARTIAL_ORGS = 100
CHUNK_ROWS = 5000

Driver = psycopg.AsyncConnection[tuple[Any, ...]]


# Every org (a row with NULL mapping columns when it has none) and its mappings, by org then mapping.
_QUERY = (
    select(
        Organization.id,
        Organization.slug,
        SentryProjectMapping.id,
        SentryProjectMapping.service_id,
        SentryProjectMapping.active,
        SentryProjectMapping.sentry_project_slug,
        SentryProjectMapping.sentry_project_id,
        SentryProjectMapping.renamed_to,
    )
    .outerjoin(SentryProjectMapping, SentryProjectMapping.org_id == Organization.id)
    .order_by(Organization.id, SentryProjectMapping.id)
)
_DIALECT = PGDialect_psycopg()  # type: ignore[no-untyped-call]
_ALL = str(_QUERY.compile(dialect=_DIALECT))
_SOME = str(_QUERY.where(Organization.id == any_(bindparam("orgs", type_=ARRAY(BigInteger)))).compile(dialect=_DIALECT))


def _changed_org(payload: str | None) -> int | None:
    """The org of a mapping's notification; None for anything else (read everything)."""
    if not payload:
        return None
    try:
        notice = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    org_id = notice.get("org_id") if isinstance(notice, dict) and "mapping_id" in notice else None
    return org_id if isinstance(org_id, int) and not isinstance(org_id, bool) else None


class MappingCache:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], libpq_url: str, refresh_seconds: float) -> None:
        self._sessions = sessions
        self._refresh_seconds = refresh_seconds
        self._orgs: dict[str, OrgMappings] = {}
        self._slugs: dict[int, str] = {}  # org id → slug, for reading one org again
        self._entries = 0
        self._loaded_at = 0.0  # the last read of everything
        self._reading = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._changed: set[int] | None = set()  # orgs named since the last read; None: read everything
        self._tasks: list[asyncio.Task[None]] = []
        self._listener = Listener(libpq_url, MAPPINGS_CHANNEL, self._notified, name="mapping")
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
        """Read every org and mapping."""
        async with self._reading:
            started = time.perf_counter()
            read = await self._read(_ALL, {})
            self._orgs = {slug: mappings for slug, mappings in read.values()}
            self._slugs = {org_id: slug for org_id, (slug, _) in read.items()}
            self._entries = sum(mappings.size for mappings in self._orgs.values())
            self._loaded_at = time.monotonic()
            self._loaded(trigger, started)

    async def load_orgs(self, org_ids: set[int], trigger: str = "notify") -> None:
        """Read the mappings of ``org_ids`` only (an org no longer there is dropped)."""
        async with self._reading:
            started = time.perf_counter()
            read = await self._read(_SOME, {"orgs": sorted(org_ids)})
            for org_id in org_ids:
                old = self._slugs.pop(org_id, None)
                if old is not None:
                    gone = self._orgs.pop(old, None)
                    self._entries -= gone.size if gone is not None else 0
                if org_id in read:
                    slug, mappings = read[org_id]
                    replaced = self._orgs.get(slug)
                    self._entries += mappings.size - (replaced.size if replaced is not None else 0)
                    self._orgs[slug] = mappings
                    self._slugs[org_id] = slug
            self._loaded(trigger, started)

    def _loaded(self, trigger: str, started: float) -> None:
        metrics.MAPPING_CACHE_ENTRIES.set(self._entries)
        metrics.MAPPING_CACHE_REFRESHES.labels(trigger=trigger).inc()
        metrics.MAPPING_CACHE_REFRESH_SECONDS.observe(time.perf_counter() - started)

    async def _read(self, query: str, params: dict[str, Any]) -> dict[int, tuple[str, OrgMappings]]:
        """org id → (slug, mappings) of what ``query`` returns (rows ordered by org). A server-side cursor,
        read a chunk at a time: neither the whole result nor its rows are held at once, and routing
        goes on between chunks."""
        out: dict[int, tuple[str, OrgMappings]] = {}
        async with self._sessions() as session:
            raw = await (await session.connection()).get_raw_connection()
            async with typed(Driver, raw.driver_connection).cursor("mapping_cache") as cursor:
                await cursor.execute(query, params)
                org_id, slug = None, ""
                entries: list[MappingEntry] = []
                while rows := await cursor.fetchmany(CHUNK_ROWS):
                    for row in rows:
                        if row[0] != org_id:
                            if org_id is not None:
                                out[org_id] = (slug, self._org(slug, entries))
                            org_id, slug, entries = row[0], row[1], []
                        if row[2] is not None:
                            entries.append(MappingEntry(*row[2:]))
                if org_id is not None:
                    out[org_id] = (slug, self._org(slug, entries))
        return out

    def _org(self, slug: str, entries: list[MappingEntry]) -> OrgMappings:
        """The org's mappings (``entries`` in id order): the cached ones themselves when nothing changed,
        so a read of everything holds one copy of the unchanged orgs, not two."""
        cached = self._orgs.get(slug)
        if cached is not None and cached.size == len(entries):
            if list(islice(cached.by_slug.values(), cached.size)) == entries:  # by_slug: own slugs first, by id
                return cached
        return OrgMappings.of(entries)

    def _notified(self, payload: str | None) -> None:
        org_id = _changed_org(payload)
        if org_id is None:
            self._changed = None
        elif self._changed is not None:
            self._changed.add(org_id)
        self._dirty.set()

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
            changed, self._changed = self._changed, set()
            partial = (
                trigger == "notify"
                and changed is not None
                and len(changed) <= MAX_PARTIAL_ORGS
                and self.age_seconds < self._refresh_seconds
            )
            try:
                if partial and changed is not None:
                    await self.load_orgs(changed, trigger)
                else:
                    await self.load(trigger)
            except Exception:
                log.exception("mapping cache refresh failed; keeping the previous mappings")
                self._changed = None  # whatever was pending: everything is read at the next refresh
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
