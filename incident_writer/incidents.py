"""What an event does to its incident: pure rules of DESIGN.md "Incidents and audit records"."""

from __future__ import annotations

from enum import StrEnum

from shared import sentry


class IncidentAction(StrEnum):
    OCCURRENCE = "occurrence"  # opens, or updates (count, last seen, level) and reopens
    RESOLVE = "resolve"
    REOPEN = "reopen"
    ATTACH = "attach"  # no incident change: linked to the incident when one exists


_OCCURRENCES = {
    (sentry.ISSUE, "created"),
    (sentry.ERROR, "created"),
    (sentry.EVENT_ALERT, "triggered"),
    (sentry.METRIC_ALERT, "critical"),
    (sentry.METRIC_ALERT, "warning"),
    (sentry.LEGACY, "triggered"),
}
_RESOLVES = {(sentry.ISSUE, "resolved"), (sentry.METRIC_ALERT, "resolved")}
_REOPENS = {(sentry.ISSUE, "unresolved")}

# Ascending severity; an incident's level only ever escalates.
LEVELS = ("debug", "info", "warning", "error", "critical", "fatal")


def incident_action(resource: str, action: str) -> IncidentAction:
    key = (resource, action)
    if key in _OCCURRENCES:
        return IncidentAction.OCCURRENCE
    if key in _RESOLVES:
        return IncidentAction.RESOLVE
    if key in _REOPENS:
        return IncidentAction.REOPEN
    return IncidentAction.ATTACH


def escalate(current: str | None, new: str | None) -> str | None:
    def rank(level: str | None) -> int:
        return LEVELS.index(level) if level in LEVELS else -1

    return new if rank(new) > rank(current) else current
