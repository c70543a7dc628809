"""Routing decisions: pure functions from a parsed webhook and the org's mappings to outputs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.events import Reason
from shared.sentry import ParsedWebhook, ProjectRef


@dataclass(frozen=True, slots=True)  # slots: the router holds one per mapping (100,000s)
class MappingEntry:
    id: int
    service_id: int
    active: bool
    slug: str = ""
    project_id: str | None = None  # Sentry's numeric project id, once known
    renamed_to: str | None = None  # the slug Sentry now uses for the project, when it was renamed


@dataclass(slots=True)
class OrgMappings:
    """One org's mappings, found by Sentry project id or by slug (O(1) either way).

    ``by_slug`` holds each mapping's own slug and, for a project renamed in Sentry, its new slug
    (unless another mapping owns that slug), so slug-only deliveries of a renamed project
    (metric alerts, comments) still find their mapping. ``size`` is how many mappings there are.
    """

    by_slug: dict[str, MappingEntry] = field(default_factory=dict)
    by_id: dict[str, MappingEntry] = field(default_factory=dict)
    size: int = 0

    @classmethod
    def of(cls, entries: Iterable[MappingEntry]) -> OrgMappings:
        org = cls()
        entries = sorted(entries, key=lambda m: m.id)
        org.size = len(entries)
        for m in entries:
            org.by_slug[m.slug] = m
            if m.project_id is not None:
                org.by_id.setdefault(m.project_id, m)
        for m in entries:
            if m.renamed_to:
                org.by_slug.setdefault(m.renamed_to, m)
        return org

    def get(self, slug: str) -> MappingEntry | None:
        return self.by_slug.get(slug)

    def resolve(self, project: ProjectRef) -> MappingEntry | None:
        """The project's mapping: by Sentry project id first, then by slug."""
        if project.id is not None:
            found = self.by_id.get(project.id)
            if found is not None:
                return found
        return self.by_slug.get(project.slug)


@dataclass(frozen=True)
class Decision:
    """One output event: routed when ``mapping`` is set and ``reason`` is None, else ignored.

    ``renamed_from`` is the mapping's slug when the delivery names the project by another (the
    project was renamed in Sentry): the delivery still follows the mapping, and the rename is recorded.
    """

    project: ProjectRef | None
    mapping: MappingEntry | None
    reason: Reason | None

    @property
    def routed(self) -> bool:
        return self.reason is None

    @property
    def renamed_from(self) -> str | None:
        if self.mapping is None or self.project is None or self.mapping.slug == self.project.slug:
            return None
        return self.mapping.slug or None


def route(parsed: ParsedWebhook, org_mappings: OrgMappings | None) -> list[Decision]:
    """Decide each project the webhook names.

    ``org_mappings`` is None when the org is unknown. A metric alert naming several projects yields
    one decision per project.
    """
    if org_mappings is None:
        return [Decision(_first(parsed), None, Reason.UNKNOWN_ORG)]
    if not parsed.known_resource:
        return [Decision(_first(parsed), None, Reason.UNSUPPORTED_RESOURCE)]
    if not parsed.projects:
        return [Decision(None, None, Reason.NO_PROJECT)]
    decisions = []
    for project in parsed.projects:
        mapping = org_mappings.resolve(project)
        if mapping is None:
            decisions.append(Decision(project, None, Reason.UNMAPPED))
        elif not mapping.active:
            decisions.append(Decision(project, mapping, Reason.MAPPING_INACTIVE))
        else:
            decisions.append(Decision(project, mapping, None))
    return decisions


def _first(parsed: ParsedWebhook) -> ProjectRef | None:
    return parsed.projects[0] if parsed.projects else None
