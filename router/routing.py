"""Routing decisions: pure functions from a parsed webhook and the org's mappings to outputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.events import Reason
from shared.sentry import ParsedWebhook, ProjectRef


@dataclass(frozen=True)
class MappingEntry:
    id: int
    service_id: int
    active: bool


@dataclass(frozen=True)
class Decision:
    """One output event: routed when ``mapping`` is set and ``reason`` is None, else ignored."""

    project: ProjectRef | None
    mapping: MappingEntry | None
    reason: Reason | None

    @property
    def routed(self) -> bool:
        return self.reason is None


def route(parsed: ParsedWebhook, org_mappings: Mapping[str, MappingEntry] | None) -> list[Decision]:
    """Decide each project the webhook names.

    ``org_mappings`` is the org's mappings by Sentry project slug, or None when the org is unknown.
    A metric alert naming several projects yields one decision per project.
    """
    if org_mappings is None:
        return [Decision(_first(parsed), None, Reason.UNKNOWN_ORG)]
    if not parsed.known_resource:
        return [Decision(_first(parsed), None, Reason.UNSUPPORTED_RESOURCE)]
    if not parsed.projects:
        return [Decision(None, None, Reason.NO_PROJECT)]
    decisions = []
    for project in parsed.projects:
        mapping = org_mappings.get(project.slug)
        if mapping is None:
            decisions.append(Decision(project, None, Reason.UNMAPPED))
        elif not mapping.active:
            decisions.append(Decision(project, mapping, Reason.MAPPING_INACTIVE))
        else:
            decisions.append(Decision(project, mapping, None))
    return decisions


def _first(parsed: ParsedWebhook) -> ProjectRef | None:
    return parsed.projects[0] if parsed.projects else None
