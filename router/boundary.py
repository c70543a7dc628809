"""The one boundary check: every value the writer stores can be read back and shown.

A webhook is valid JSON from a verified sender, but Sentry bodies are another organization's data:
one odd value must not make a record unwritable (or, worse, written but unreadable) for everyone.
The router applies :func:`sanitize` to every parsed webhook before it builds events:

- times outside a window around ``received_at`` (``event_time_before_days`` before,
  ``event_time_after_hours`` after; e.g. ``9999-12-31T23:59:59-14:00``, which PostgreSQL stores as
  year 10000 and psycopg cannot read back) are replaced by ``received_at``, flagged ``time_out_of_range``;
- NUL and lone surrogates — characters PostgreSQL text cannot hold — are removed from every string
  (ids included: the same cleaning of every delivery of an issue keeps one Sentry issue one
  incident), flagged ``text_cleaned``;
- lengths stay within their columns (the parser bounds them; ids are cut to 64 characters here too).
The flags travel on the event (``flags``) to its audit record.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.sentry import ParsedWebhook, ProjectRef
from shared.storable import clean, storable

TIME_OUT_OF_RANGE = "time_out_of_range"
TEXT_CLEANED = "text_cleaned"

_ID_MAX = 64
_TEXT_FIELDS = ("title", "level", "culprit", "web_url", "activity_type")
_ID_FIELDS = ("sentry_issue_id", "alert_identifier", "event_id")


@dataclass(frozen=True)
class TimeWindow:
    before: timedelta
    after: timedelta

    @classmethod
    def of(cls, before_days: float, after_hours: float) -> TimeWindow:
        return cls(before=timedelta(days=before_days), after=timedelta(hours=after_hours))


def sanitize(parsed: ParsedWebhook, received_at: datetime, window: TimeWindow) -> tuple[ParsedWebhook, tuple[str, ...]]:
    """``parsed`` with every value storable and readable, and the flags saying what was changed."""
    changes: dict[str, object] = {}
    if _all_clean(parsed):
        return _timed(parsed, received_at, window, changes, [])
    for name in _TEXT_FIELDS:
        value = getattr(parsed, name)
        if value is not None and not storable(value):
            changes[name] = clean(value)
    for name in _ID_FIELDS:
        value = getattr(parsed, name)
        if value is not None and (not storable(value) or len(value) > _ID_MAX):
            changes[name] = clean(value, _ID_MAX)
    projects = tuple(
        ProjectRef(p.slug, clean(p.id, _ID_MAX)) if p.id is not None and not storable(p.id) else p
        for p in parsed.projects
    )
    if projects != parsed.projects:
        changes["projects"] = projects
    return _timed(parsed, received_at, window, changes, [TEXT_CLEANED] if changes else [])


def _all_clean(parsed: ParsedWebhook) -> bool:
    """The common case in one scan: no field holds an unstorable character or an overlong id."""
    ids = [getattr(parsed, name) or "" for name in _ID_FIELDS]
    if any(len(value) > _ID_MAX for value in ids):
        return False
    texts = [getattr(parsed, name) or "" for name in _TEXT_FIELDS]
    return storable("".join(texts + ids + [p.id or "" for p in parsed.projects]))


def _timed(
    parsed: ParsedWebhook, received_at: datetime, window: TimeWindow, changes: dict[str, object], flags: list[str]
) -> tuple[ParsedWebhook, tuple[str, ...]]:
    occurred = parsed.occurred_at
    if occurred is not None and not (received_at - window.before <= occurred <= received_at + window.after):
        changes["occurred_at"] = received_at
        flags.append(TIME_OUT_OF_RANGE)
    return (parsed.model_copy(update=changes) if changes else parsed), tuple(flags)
