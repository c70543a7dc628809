"""Pure parsing of Sentry webhook bodies: which project, which issue, what happened.

Every function here takes plain data and never raises on an unexpected shape: a body whose
project cannot be found parses to a :class:`ParsedWebhook` with no projects, which the router
turns into an ``ignored`` event with reason ``no_project``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

SLUG_RE = re.compile(r"^(?![0-9]+$)[a-z0-9_-]{1,100}$")

# Resources whose shapes we know. Anything else is accepted and ignored as unsupported.
ISSUE = "issue"
ERROR = "error"
EVENT_ALERT = "event_alert"
METRIC_ALERT = "metric_alert"
COMMENT = "comment"
SEER = "seer"
PREPROD_ARTIFACT = "preprod_artifact"
INSTALLATION = "installation"
ACTIVITY_ALERT = "activity_alert"
LEGACY = "legacy_webhook"
KNOWN_RESOURCES = frozenset(
    {ISSUE, ERROR, EVENT_ALERT, METRIC_ALERT, COMMENT, SEER, PREPROD_ARTIFACT, INSTALLATION, ACTIVITY_ALERT, LEGACY}
)

_MAX_TEXT = 1000
_PROJECT_API_PATH = re.compile(r"/api/0/projects/([^/]+)/([^/]+)/")


@dataclass(frozen=True)
class ProjectRef:
    slug: str
    id: str | None = None


class SentryFields(BaseModel):
    """What a Sentry body says about one event: the one list of these fields. The parser's
    :class:`ParsedWebhook` and the routed/ignored events (``shared.events``) both extend it."""

    model_config = ConfigDict(frozen=True)

    resource: str
    action: str
    sentry_issue_id: str | None = None
    event_id: str | None = None
    title: str | None = None
    level: str | None = None
    culprit: str | None = None
    web_url: str | None = None
    occurred_at: datetime | None = None
    # ``activity_alert``: what happened to the issue (``data.activity.type``, e.g. ``status_resolved``).
    activity_type: str | None = None


SENTRY_FIELDS = tuple(SentryFields.model_fields)


class ParsedWebhook(SentryFields):
    """What BlameTrail needs from one Sentry body. ``projects`` is empty when none was found."""

    projects: tuple[ProjectRef, ...] = ()
    alert_identifier: str | None = None

    @property
    def known_resource(self) -> bool:
        return self.resource in KNOWN_RESOURCES

    @property
    def incident_key(self) -> str | None:
        """Identity of the incident this event belongs to, within one service."""
        if self.sentry_issue_id:
            return f"issue:{self.sentry_issue_id}"
        if self.alert_identifier:
            return f"metric_alert:{self.alert_identifier}"
        return None


def is_valid_slug(value: object) -> bool:
    return isinstance(value, str) and SLUG_RE.fullmatch(value) is not None


def _obj(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object, limit: int = _MAX_TEXT) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str) or not value:
        return None
    return value[:limit]


def _ident(value: object) -> str | None:
    """A Sentry id (string or integer) as a string; anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and 0 < len(value) <= 64:
        return value
    return None


def _slug(value: object) -> str | None:
    return value if isinstance(value, str) and is_valid_slug(value) else None


def _time(value: object) -> datetime | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return datetime.fromtimestamp(float(value), tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def project_from_api_url(url: object) -> str | None:
    """The project slug of ``…/api/0/projects/{org}/{slug}/events/{id}/``."""
    if not isinstance(url, str):
        return None
    match = _PROJECT_API_PATH.search(urlsplit(url).path + "/")
    return _slug(match.group(2)) if match else None


def _projects(*refs: tuple[str | None, str | None]) -> tuple[ProjectRef, ...]:
    seen: dict[str, ProjectRef] = {}
    for slug, pid in refs:
        if slug and slug not in seen:
            seen[slug] = ProjectRef(slug=slug, id=pid)
    return tuple(seen.values())


def _parse_issue(action: str, data: dict[str, Any]) -> ParsedWebhook:
    issue = _obj(data.get("issue"))
    project = _obj(issue.get("project"))
    slug = _slug(project.get("slug"))
    if slug is None:
        short_id = issue.get("shortId")
        if isinstance(short_id, str) and "-" in short_id:
            slug = _slug(short_id.rsplit("-", 1)[0].lower())
    web_url = _text(issue.get("web_url")) or _text(issue.get("permalink"))
    return ParsedWebhook(
        resource=ISSUE,
        action=action,
        projects=_projects((slug, _ident(project.get("id")))),
        sentry_issue_id=_ident(issue.get("id")),
        title=_text(issue.get("title")),
        level=_text(issue.get("level"), 32),
        culprit=_text(issue.get("culprit")),
        web_url=web_url,
        occurred_at=_time(issue.get("lastSeen")) or _time(issue.get("firstSeen")),
    )


def _parse_event(resource: str, action: str, event: dict[str, Any]) -> ParsedWebhook:
    slug = project_from_api_url(event.get("url"))
    web_url = _text(event.get("web_url"))
    return ParsedWebhook(
        resource=resource,
        action=action,
        projects=_projects((slug, _ident(event.get("project")))),
        sentry_issue_id=_ident(event.get("issue_id")),
        event_id=_ident(event.get("event_id")),
        title=_text(event.get("title")) or _text(event.get("message")),
        level=_text(event.get("level"), 32),
        culprit=_text(event.get("culprit")),
        web_url=web_url,
        occurred_at=_time(event.get("datetime")) or _time(event.get("timestamp")),
    )


def _parse_metric_alert(action: str, data: dict[str, Any]) -> ParsedWebhook:
    alert = _obj(data.get("metric_alert"))
    rule = _obj(alert.get("alert_rule"))
    names = alert.get("projects")
    if not isinstance(names, list):
        names = rule.get("projects")
    slugs = [_slug(n) for n in names] if isinstance(names, list) else []
    web_url = _text(data.get("web_url"))
    return ParsedWebhook(
        resource=METRIC_ALERT,
        action=action,
        projects=_projects(*((s, None) for s in slugs)),
        alert_identifier=_ident(alert.get("identifier")) or _ident(alert.get("id")),
        title=_text(data.get("description_title")) or _text(alert.get("title")) or _text(rule.get("name")),
        level=action if action in {"critical", "warning"} else "info",
        web_url=web_url,
        occurred_at=_time(alert.get("date_closed")) or _time(alert.get("date_started")),
    )


def _parse_comment(action: str, data: dict[str, Any]) -> ParsedWebhook:
    return ParsedWebhook(
        resource=COMMENT,
        action=action,
        projects=_projects((_slug(data.get("project_slug")), None)),
        sentry_issue_id=_ident(data.get("issue_id")),
        title=_text(data.get("comment"), 200),
        occurred_at=_time(data.get("timestamp")),
    )


def _parse_activity_alert(action: str, data: dict[str, Any]) -> ParsedWebhook:
    parsed = _parse_issue(action, data)
    alert = _obj(data.get("alert"))
    return parsed.model_copy(
        update={
            "resource": ACTIVITY_ALERT,
            "web_url": parsed.web_url or _text(alert.get("web_url")),
            "activity_type": _text(_obj(data.get("activity")).get("type"), 64),
        }
    )


def _parse_legacy(body: dict[str, Any]) -> ParsedWebhook:
    event = _obj(body.get("event"))
    slug = _slug(body.get("project_slug")) or _slug(body.get("project"))
    url = _text(body.get("url"))
    return ParsedWebhook(
        resource=LEGACY,
        action="triggered",
        projects=_projects((slug, None)),
        sentry_issue_id=_ident(body.get("id")),
        event_id=_ident(event.get("event_id")),
        title=_text(body.get("message")) or _text(event.get("title")),
        level=_text(body.get("level"), 32),
        culprit=_text(body.get("culprit")),
        web_url=url,
        occurred_at=_time(event.get("timestamp")) or _time(event.get("received")),
    )


def parse_webhook(resource: str, body: object) -> ParsedWebhook:
    """Classify one decoded webhook body sent with ``Sentry-Hook-Resource: resource``."""
    root = _obj(body)
    if resource == LEGACY:
        return _parse_legacy(root)
    action = _text(root.get("action"), 64) or ""
    data = _obj(root.get("data"))
    if resource == ISSUE:
        return _parse_issue(action, data)
    if resource == ERROR:
        return _parse_event(ERROR, action, _obj(data.get("error")))
    if resource == EVENT_ALERT:
        return _parse_event(EVENT_ALERT, action, _obj(data.get("event")))
    if resource == METRIC_ALERT:
        return _parse_metric_alert(action, data)
    if resource == COMMENT:
        return _parse_comment(action, data)
    if resource == ACTIVITY_ALERT:
        return _parse_activity_alert(action, data)
    if resource == PREPROD_ARTIFACT:
        return ParsedWebhook(
            resource=resource,
            action=action,
            projects=_projects((_slug(data.get("projectSlug")), None)),
        )
    if resource == SEER:
        return ParsedWebhook(resource=resource, action=action, sentry_issue_id=_ident(data.get("group_id")))
    return ParsedWebhook(resource=resource, action=action)


def record_key(org: str, sentry_issue_id: str | None, project_slug: str | None) -> str:
    """The Kafka record key: ``{org}/{issue}`` when there is a Sentry issue, else ``{org}/{project}``,
    else ``{org}`` — one issue's events stay in order on one partition."""
    if sentry_issue_id:
        return f"{org}/{sentry_issue_id}"
    if project_slug:
        return f"{org}/{project_slug}"
    return org


def partition_key(org: str, parsed: ParsedWebhook) -> str:
    """:func:`record_key` of a parsed webhook (its first project)."""
    return record_key(org, parsed.sentry_issue_id, parsed.projects[0].slug if parsed.projects else None)


def raw_record_key(org: str, resource: str, body: object) -> str:
    """``partition_key(org, parse_webhook(resource, body))`` without parsing the rest of the body:
    only the Sentry issue id and the first project slug, found where :func:`parse_webhook` finds them.
    Ingest keys its raw records with it."""
    root = _obj(body)
    data = _obj(root.get("data"))
    issue_id: str | None = None
    slug: str | None = None
    if resource == LEGACY:
        issue_id, slug = _ident(root.get("id")), _slug(root.get("project_slug")) or _slug(root.get("project"))
    elif resource in (ISSUE, ACTIVITY_ALERT):
        issue = _obj(data.get("issue"))
        short_id = issue.get("shortId")
        issue_id, slug = _ident(issue.get("id")), _slug(_obj(issue.get("project")).get("slug"))
        if slug is None and isinstance(short_id, str) and "-" in short_id:
            slug = _slug(short_id.rsplit("-", 1)[0].lower())
    elif resource in (ERROR, EVENT_ALERT):
        event = _obj(data.get("error" if resource == ERROR else "event"))
        issue_id, slug = _ident(event.get("issue_id")), project_from_api_url(event.get("url"))
    elif resource == METRIC_ALERT:
        alert = _obj(data.get("metric_alert"))
        names = alert.get("projects")
        if not isinstance(names, list):
            names = _obj(alert.get("alert_rule")).get("projects")
        slug = next((s for s in map(_slug, names) if s), None) if isinstance(names, list) else None
    elif resource == COMMENT:
        issue_id, slug = _ident(data.get("issue_id")), _slug(data.get("project_slug"))
    elif resource == PREPROD_ARTIFACT:
        slug = _slug(data.get("projectSlug"))
    elif resource == SEER:
        issue_id = _ident(data.get("group_id"))
    return record_key(org, issue_id, slug)
