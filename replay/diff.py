"""The routing diff of a dry-run raw replay: per project, what its deliveries were then and would be now.

"Then" is each delivery's audit record (unique on ``(delivery_id, project_slug)``); "now" is
``router.routing.route`` over today's mappings (``MappingCache`` loaded once), issue-only deliveries
resolved through the issue → project index as the router does. Only an ignored delivery that
routes now would change (and one the writer failed to store): an already-routed delivery never moves.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from router.cache import IssueProjects, MappingCache
from router.consumer import Delivery, with_issue_project
from router.routing import Decision, route
from shared.db.conninfo import libpq_url
from shared.db.models import AuditRecord, Service
from shared.settings import Settings

_BATCH = 500
# Audit outcomes a routed replay upgrades once (the writer: ``incident_writer/store.py::_insert_audit``).
UPGRADABLE = ("ignored", "failed")


@dataclass
class ProjectDiff:
    org: str
    project: str | None
    would_route: Counter[int] = field(default_factory=Counter)  # service id → ignored (or failed) then, routes now
    stays: int = 0  # the same outcome (and service) then and now
    will_not_move: int = 0  # routed then; today's mappings route it elsewhere or ignore it: it stays put
    not_recorded: int = 0  # no audit record: the writer never saw it

    def count(self, then: tuple[str, int | None] | None, decision: Decision) -> None:
        now = decision.mapping.service_id if decision.routed and decision.mapping is not None else None
        if then is None:
            self.not_recorded += 1
        elif then[0] in UPGRADABLE and now is not None:
            self.would_route[now] += 1
        elif then[0] == "routed" and now != then[1]:
            self.will_not_move += 1
        else:
            self.stays += 1

    def as_json(self, names: dict[int, str]) -> dict[str, Any]:
        return {
            "org": self.org,
            "project": self.project,
            "would_route": {names.get(s, f"service {s}"): n for s, n in sorted(self.would_route.items())},
            "stays": self.stays,
            "will_not_move": self.will_not_move,
            "not_recorded": self.not_recorded,
        }


class RoutingDiff:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
        self.cache = MappingCache(sessions, libpq_url(settings), settings.mapping_refresh_seconds)
        self._issues = IssueProjects(sessions)
        self._sessions = sessions
        self._pending: list[tuple[str, str, str | None, Decision]] = []
        self._seen: set[tuple[str, str | None]] = set()
        self._projects: dict[tuple[str, str | None], ProjectDiff] = {}

    async def load(self) -> None:
        await self.cache.load()

    async def add(self, delivery: Delivery) -> None:
        """Count one raw delivery (each (delivery, project) once, however often it was delivered)."""
        org_mappings = self.cache.lookup(delivery.org)
        if org_mappings is not None:
            delivery = await with_issue_project(delivery, self._issues)
        for decision in route(delivery.parsed, org_mappings):
            slug = decision.project.slug if decision.project else None
            if (delivery.delivery_id, slug) not in self._seen:
                self._seen.add((delivery.delivery_id, slug))
                self._pending.append((delivery.delivery_id, delivery.org, slug, decision))
        if len(self._pending) >= _BATCH:
            await self._resolve()

    async def _resolve(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        async with self._sessions() as session:
            rows = await session.execute(
                select(AuditRecord.delivery_id, AuditRecord.project_slug, AuditRecord.outcome, AuditRecord.service_id)
                .where(AuditRecord.delivery_id.in_({p[0] for p in pending}))
            )  # fmt: skip
        then = {(d, slug): (outcome, service) for d, slug, outcome, service in rows}
        for delivery_id, org, slug, decision in pending:
            diff = self._projects.setdefault((org, slug), ProjectDiff(org, slug))
            diff.count(then.get((delivery_id, slug)), decision)

    async def finish(self) -> list[dict[str, Any]]:
        """One row a project, sorted by org and project."""
        await self._resolve()
        services = {s for diff in self._projects.values() for s in diff.would_route}
        names: dict[int, str] = {}
        if services:
            async with self._sessions() as session:
                found = await session.execute(select(Service.id, Service.name).where(Service.id.in_(services)))
                names = {service_id: name for service_id, name in found}
        return [self._projects[key].as_json(names) for key in sorted(self._projects, key=lambda k: (k[0], k[1] or ""))]
