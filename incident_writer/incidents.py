"""What events do to their incident: the pure rules of DESIGN.md "Incidents and audit records".

No I/O here. :func:`apply` folds the new events of one incident, in stream order, over the
incident's current state and returns its new state plus one timeline entry per event that reached
it; ``incident_writer.store`` reads the state, calls it, and writes the result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

from shared import sentry
from shared.db.models import IncidentStatus


class IncidentAction(StrEnum):
    OCCURRENCE = "occurrence"  # opens, or updates (count, last seen, level); reopens a resolved one
    RESOLVE = "resolve"  # open or archived → resolved
    REOPEN = "reopen"  # resolved or archived → open
    ARCHIVE = "archive"  # open or resolved → archived (muted: occurrences count, nothing else reopens)
    ATTACH = "attach"  # no incident change: linked to the incident when one exists


class Change(StrEnum):
    """What one event did to its incident: the timeline's ``change`` and the metric's label."""

    OPENED = "opened"  # first occurrence: the incident now exists
    UPDATED = "updated"  # another occurrence of an open or archived incident
    RESOLVED = "resolved"  # open or archived → resolved
    REOPENED = "reopened"  # resolved → open by a new occurrence; resolved or archived → open by a reopen
    ARCHIVED = "archived"  # open or resolved → archived
    ATTACHED = "attached"  # on the timeline, state unchanged (comment, assignment, repeated resolve, …)


OPEN = IncidentStatus.OPEN
RESOLVED = IncidentStatus.RESOLVED
ARCHIVED = IncidentStatus.ARCHIVED

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
# ``issue.ignored`` is the UI's "Archive"; installations subscribed to the old name get ``issue.archived``.
_ARCHIVES = {(sentry.ISSUE, "ignored"), (sentry.ISSUE, "archived")}

# ``activity_alert.triggered`` acts by ``data.activity.type``; other types (pull requests, seer) attach.
ACTIVITY_ACTIONS = {
    "status_resolved": IncidentAction.RESOLVE,
    "status_resolved_in_release": IncidentAction.RESOLVE,
    "status_resolved_by_age": IncidentAction.RESOLVE,
    "status_resolved_in_commit": IncidentAction.RESOLVE,
    "status_unresolved": IncidentAction.REOPEN,
    "status_regression": IncidentAction.REOPEN,
    "status_escalating": IncidentAction.REOPEN,
    "status_ignored": IncidentAction.ARCHIVE,
}

# Ascending severity; an incident's level only ever escalates.
LEVELS = ("debug", "info", "warning", "error", "critical", "fatal")


def incident_action(resource: str, action: str, activity_type: str | None = None) -> IncidentAction:
    """The incident action of a Sentry ``resource`` + ``action`` (+ an activity alert's type);
    anything unknown only attaches."""
    if resource == sentry.ACTIVITY_ALERT:
        return ACTIVITY_ACTIONS.get(activity_type or "", IncidentAction.ATTACH)
    key = (resource, action)
    if key in _OCCURRENCES:
        return IncidentAction.OCCURRENCE
    if key in _RESOLVES:
        return IncidentAction.RESOLVE
    if key in _REOPENS:
        return IncidentAction.REOPEN
    if key in _ARCHIVES:
        return IncidentAction.ARCHIVE
    return IncidentAction.ATTACH


def escalate(current: str | None, new: str | None) -> str | None:
    """The more severe of two levels; an unknown or missing level never replaces a known one."""

    def rank(level: str | None) -> int:
        return LEVELS.index(level) if level in LEVELS else -1

    return new if rank(new) > rank(current) else current


class Touch(NamedTuple):
    """One event for one incident, as the rules see it.

    ``seen_at`` is when it happened (Sentry's time, else when ingest received it); ``title`` is the
    title an incident opened by this event gets. (Touch and IncidentState are named tuples: the writer
    makes one of each per event, and a frozen dataclass took 4-5x as long to build.)
    """

    delivery_id: str
    action: IncidentAction
    seen_at: datetime
    received_at: datetime
    title: str
    level: str | None = None
    culprit: str | None = None
    web_url: str | None = None
    sentry_issue_id: str | None = None
    project_slug: str | None = None


class IncidentState(NamedTuple):
    """The columns of an incident that events change."""

    status: str
    event_count: int
    title: str
    level: str | None
    first_seen_at: datetime
    last_seen_at: datetime
    resolved_at: datetime | None
    culprit: str | None
    web_url: str | None
    sentry_issue_id: str | None
    sentry_project_slug: str | None


@dataclass(frozen=True)
class Outcome:
    """The result of :func:`apply` for one incident.

    ``after`` is None when there still is no incident (only resolves, reopens or comments for an
    incident that never opened). ``changes`` holds one (delivery, change) per delivery newly applied,
    in order: the incident's new timeline entries. ``linked`` is every delivery that concerns the
    existing incident, including those applied before: their audit records name the incident.
    """

    before: IncidentState | None
    after: IncidentState | None
    changes: tuple[tuple[str, Change], ...]
    linked: frozenset[str]


def apply(state: IncidentState | None, touches: Iterable[Touch], applied: frozenset[str] = frozenset()) -> Outcome:
    """Fold ``touches`` (stream order) over ``state`` (None: no incident yet).

    Each delivery takes effect once: a delivery in ``applied`` (already on the incident's timeline)
    or seen earlier in ``touches`` is only linked. Before the incident exists, only an occurrence
    does anything: a resolve, reopen or comment for an incident that never opened is a no-op.
    Never raises.
    """
    current = state
    changes: dict[str, Change] = {}
    linked: set[str] = set()
    for touch in touches:
        if current is None and touch.action is not IncidentAction.OCCURRENCE:
            continue
        linked.add(touch.delivery_id)
        if touch.delivery_id in applied or touch.delivery_id in changes:
            continue
        current, change = _step(current, touch)
        changes[touch.delivery_id] = change
    return Outcome(before=state, after=current, changes=tuple(changes.items()), linked=frozenset(linked))


def _step(current: IncidentState | None, touch: Touch) -> tuple[IncidentState, Change]:
    if touch.action is IncidentAction.OCCURRENCE:
        if current is None:
            return _opened(touch), Change.OPENED
        # An archived issue stays muted: its occurrences count, but only a reopen unmutes it. An
        # occurrence from before the last resolution (a replay, applied by its original time)
        # counts without reopening.
        status = current.status
        if status == RESOLVED and not _before_resolution(current, touch):
            status = OPEN
        change = Change.REOPENED if status != current.status else Change.UPDATED
        return current._replace(
            status=status,
            resolved_at=current.resolved_at if status == RESOLVED else None,
            event_count=current.event_count + 1,
            level=escalate(current.level, touch.level),
            first_seen_at=min(current.first_seen_at, touch.seen_at),
            last_seen_at=max(current.last_seen_at, touch.seen_at),
            culprit=current.culprit or touch.culprit,
            web_url=current.web_url or touch.web_url,
            sentry_issue_id=current.sentry_issue_id or touch.sentry_issue_id,
        ), change
    assert current is not None, "only an occurrence can open an incident"
    if touch.action is IncidentAction.RESOLVE and current.status != RESOLVED:
        return current._replace(status=RESOLVED, resolved_at=touch.received_at), Change.RESOLVED
    if touch.action is IncidentAction.REOPEN and current.status != OPEN:
        return current._replace(status=OPEN, resolved_at=None), Change.REOPENED
    if touch.action is IncidentAction.ARCHIVE and current.status != ARCHIVED:
        return current._replace(status=ARCHIVED, resolved_at=None), Change.ARCHIVED
    return current, Change.ATTACHED


def _before_resolution(current: IncidentState, touch: Touch) -> bool:
    return current.resolved_at is not None and touch.received_at < current.resolved_at


def _opened(touch: Touch) -> IncidentState:
    return IncidentState(
        status=OPEN,
        event_count=1,
        title=touch.title,
        level=touch.level,
        first_seen_at=touch.seen_at,
        last_seen_at=touch.seen_at,
        resolved_at=None,
        culprit=touch.culprit,
        web_url=touch.web_url,
        sentry_issue_id=touch.sentry_issue_id,
        sentry_project_slug=touch.project_slug,
    )
