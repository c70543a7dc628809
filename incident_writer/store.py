"""Writes one batch of routed/ignored events in the caller's transaction: audit records, incidents, timeline.

A constant number of statements per batch, whatever its size:

1. the batch's organizations (slug → id);
2. ``SELECT … FROM incidents … ORDER BY service_id, incident_key FOR NO KEY UPDATE``: the existing
   incidents of the batch's routed events, locked, with their state;
3. ``INSERT audit_records … ON CONFLICT (delivery_id, project_slug) DO NOTHING RETURNING``: the
   events that are new (linked to their incident when it exists). Only a new event may touch an
   incident, so redeliveries and replays change nothing;
4. which new deliveries are already on those incidents' timelines (the other project of a
   multi-project metric alert, written in an earlier batch): a delivery counts once per incident;
5. ``incidents.apply`` folds each incident's new events, in stream order, over its locked state;
6. ``INSERT incidents … ON CONFLICT DO NOTHING RETURNING`` for the incidents that open now. A
   conflict means another writer opened one after step 2: :class:`ConcurrentIncident`, the caller
   retries the transaction (step 2 then finds and locks it), so an incident never opens twice;
7. ``UPDATE incidents`` with the folded state; ``INSERT incident_events`` (the timeline); and
   ``UPDATE audit_records SET incident_id`` for the events of incidents opened in step 6.

Rows travel as one JSON parameter per statement (``jsonb_populate_recordset``), so each statement's
text is the same for any batch: psycopg and Postgres parse and plan it once, and a batch costs a
handful of round trips instead of one per event. Each statement is compiled to SQL once, at import,
and runs on the session's psycopg connection (no SQLAlchemy building, cache keys or result
processing per batch); statements that do not wait for each other share a round trip (psycopg's
pipeline mode): 2 with 4, and 7 with the learned projects (6 is a round trip of its own when
incidents open) — three round trips and the commit for a batch of existing incidents.

Between writers, rows are locked in one global order — incidents sorted by service and key, then
audit keys sorted — so two writers on overlapping batches wait for each other instead of
deadlocking (a deadlock would still only cost a retry). Errors: an ``IntegrityError``/``DataError``
or :class:`Unwritable` names a record that cannot be written (the caller isolates it); anything
else is the database's state (the caller retries).
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from typing import cast as typed

import orjson
import psycopg
from sqlalchemy import Table, Text, bindparam, cast, func, literal_column, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ClauseElement, ColumnElement, KeyedColumnElement
from sqlalchemy.sql.selectable import TableValuedAlias

from incident_writer.incidents import Change, IncidentState, Outcome, Touch, apply, incident_action
from shared.db.models import AuditRecord, Incident, IncidentEvent, Organization, Service
from shared.events import IgnoredEvent, OutputEvent, RoutedEvent
from shared.storable import clean

AUDIT = typed(Table, AuditRecord.__table__)
INCIDENTS = typed(Table, Incident.__table__)
TIMELINE = typed(Table, IncidentEvent.__table__)

IncidentKey = tuple[int, str]  # (service_id, incident_key)

TENANT_MISMATCH = "tenant_mismatch"


def _rows(table: Table, names: Sequence[str]) -> TableValuedAlias:
    """``jsonb_populate_recordset(NULL::<table>, :rows)``: a batch's rows as one JSON parameter.

    The statement's text is the same for any number of rows (parsed and planned once), and each
    value is read as its column's own type: a value too long or out of range is a ``DataError``
    naming the column, as with a plain INSERT.
    """
    json = cast(bindparam("rows", type_=Text), JSONB)
    return func.jsonb_populate_recordset(literal_column(f"NULL::{table.name}"), json).table_valued(*names)


def _json(rows: Sequence[dict[str, object]]) -> dict[str, str]:
    """The parameters of :func:`_rows`; :class:`Unwritable` for a value JSON cannot carry (an
    integer beyond 64 bits: no column takes it either). Naive times are read as UTC."""
    try:
        return {"rows": orjson.dumps(rows, option=orjson.OPT_NAIVE_UTC).decode()}
    except orjson.JSONEncodeError as exc:
        raise Unwritable(str(exc)) from exc


def _select_all(source: TableValuedAlias, names: Sequence[str]) -> list[KeyedColumnElement[Any]]:
    return [source.c[name] for name in names]


_DIALECT = PGDialect_psycopg()  # type: ignore[no-untyped-call]


def _sql(statement: ClauseElement) -> str:
    """``statement`` compiled once, at import, to the driver's SQL (``%(rows)s`` parameters): a batch
    then costs no SQLAlchemy statement building, cache-key or result processing, only the driver."""
    sql = str(statement.compile(dialect=_DIALECT))
    assert "POSTCOMPILE" not in sql and set(re.findall(r"%\((\w+)\)s", sql)) <= {"rows"}, sql
    return sql


def _literal(value: str) -> ColumnElement[str]:
    """A constant written into the statement's text (its only parameter is ``rows``)."""
    return literal_column(f"'{value}'", Text)


Driver = psycopg.AsyncConnection[tuple[Any, ...]]


async def _driver(session: AsyncSession) -> Driver:
    """The psycopg connection of ``session``'s transaction (statements on it are in that transaction)."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    return typed(Driver, raw.driver_connection)


async def _fetch(conn: Driver, sql: str, rows: Sequence[dict[str, object]]) -> list[tuple[Any, ...]]:
    async with conn.cursor() as cursor:
        await cursor.execute(sql, _json(rows))
        return await cursor.fetchall()


class ConcurrentIncident(Exception):
    """Another writer opened one of this batch's incidents during the transaction: retry it."""


class Unwritable(Exception):
    """A value of the batch no column can hold, found before it reached the database."""


@dataclass
class BatchResult:
    """What one batch did: new events, duplicates, incident changes and timeline entries."""

    written: int = 0
    duplicates: int = 0
    changes: Counter[str] = field(default_factory=Counter)
    timeline: int = 0
    # Events refused before writing, and why: a routed event naming another org's service.
    refused: list[tuple[OutputEvent, str]] = field(default_factory=list)
    # (delivery_id, project_slug) of the events that took effect (new or upgraded audit records).
    applied: set[tuple[str, str | None]] = field(default_factory=set)

    def add(self, other: BatchResult) -> None:
        self.written += other.written
        self.duplicates += other.duplicates
        self.changes.update(other.changes)
        self.timeline += other.timeline
        self.refused += other.refused
        self.applied |= other.applied


@dataclass(frozen=True)
class _Locked:
    """An existing incident, locked by this transaction, and its state."""

    id: int
    state: IncidentState


class _New(NamedTuple):
    """A new event (its audit record was inserted now) that belongs to an incident."""

    audit_id: int
    event: RoutedEvent
    touch: Touch


def poison_reason(exc: Exception) -> str | None:
    """The reason a batch failed because of a record in it, or None when it is not the records' fault.

    Integrity errors (a foreign key to a service or organisation that no longer exists, a missing
    required value) and data errors (a value too long or out of range, a NUL byte in an id) fail
    again on every retry; everything else (connection lost, server shutting down, deadlock, a
    missing table after a bad deploy) may pass, and is retried rather than dead-lettered.
    """
    if isinstance(exc, IntegrityError | DataError | psycopg.IntegrityError | psycopg.DataError | Unwritable):
        return describe_error(exc)
    return None


def describe_error(exc: BaseException) -> str:
    """``ErrorClass: first line`` of the driver's error (without SQLAlchemy's statement and parameters)."""
    orig = getattr(exc, "orig", None)
    source = orig if isinstance(orig, BaseException) else exc
    first_line = (str(source).strip().splitlines() or [""])[0]
    return f"{type(source).__name__}: {first_line}" if first_line else type(source).__name__


async def write_batch(session: AsyncSession, batch: Sequence[OutputEvent]) -> BatchResult:
    """Apply ``batch`` (stream order) in the caller's transaction; the caller commits.

    Exactly once in effect: one audit record per (delivery, project); an incident changes only for
    new audit records, and once per delivery. Raises the database's errors unchanged, and
    :class:`ConcurrentIncident` when the transaction must be retried.
    """
    result = BatchResult()
    events = _first_per_key(batch)
    result.duplicates = len(batch) - len(events)
    if not events:
        return result
    org_ids = await _org_ids(session, {e.org for e in events})
    result.refused = await _foreign_services(session, events, org_ids)
    if result.refused:
        refused = {id(e) for e, _ in result.refused}
        events = [e for e in events if id(e) not in refused]
    conn = await _driver(session)
    routed = [e for e in events if isinstance(e, RoutedEvent) and e.incident_key]
    existing, applied = await _lock_incidents(conn, routed) if routed else ({}, {})
    new = await _insert_audit(conn, events, org_ids, existing)
    result.written = len(new)
    result.applied = {(e.delivery_id, e.project_slug) for _, e in new}
    result.duplicates += len(events) - len(new)
    groups: dict[IncidentKey, list[_New]] = {}
    for audit_id, event in new:
        if isinstance(event, RoutedEvent) and event.incident_key:
            key = (event.service_id, event.incident_key)
            groups.setdefault(key, []).append(_New(audit_id, event, _touch(event)))
    writes = await _apply_incidents(conn, groups, existing, applied, org_ids, result) if groups else []
    writes += _learned([event for _, event in new], org_ids)
    await _write_all(conn, writes)
    return result


# A statement of the batch's last round trip and its rows (see :func:`_write_all`).
_Write = tuple[str, list[dict[str, object]]]


async def _write_all(conn: Driver, writes: Sequence[_Write]) -> None:
    """The batch's remaining statements (incident updates, timeline, links, what deliveries teach),
    in order, in one round trip (psycopg's pipeline mode); the first error raises."""
    if not writes:
        return
    params = [(sql, _json(rows)) for sql, rows in writes]  # Unwritable before anything is sent
    async with conn.pipeline():
        for sql, values in params:
            await conn.execute(sql, values)


_LEARN_MAPPINGS = _sql(
    text(
        """
    UPDATE sentry_project_mappings AS m
    SET sentry_project_id = coalesce(m.sentry_project_id, v.project_id),
        renamed_to = CASE WHEN v.renamed THEN v.slug ELSE m.renamed_to END
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(mapping_id bigint, project_id text, slug text, renamed boolean)
    WHERE m.id = v.mapping_id
      AND ((NOT v.renamed AND m.sentry_project_id IS NULL AND v.project_id IS NOT NULL)
           OR (v.renamed AND m.renamed_to IS DISTINCT FROM v.slug))
    """
    )
)
_LEARN_ISSUES = _sql(
    text(
        """
    INSERT INTO sentry_issue_projects AS i (org_id, sentry_issue_id, sentry_project_id, project_slug)
    SELECT v.org_id, v.issue_id, v.project_id, v.slug
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(org_id bigint, issue_id text, project_id text, slug text)
    ORDER BY v.org_id, v.issue_id
    ON CONFLICT (org_id, sentry_issue_id) DO UPDATE
    SET project_slug = excluded.project_slug,
        sentry_project_id = coalesce(excluded.sentry_project_id, i.sentry_project_id),
        updated_at = now()
    WHERE i.project_slug IS DISTINCT FROM excluded.project_slug
       OR (excluded.sentry_project_id IS NOT NULL AND i.sentry_project_id IS DISTINCT FROM excluded.sentry_project_id)
    """
    )
)


def _learned(events: Sequence[OutputEvent], org_ids: dict[str, int]) -> list[_Write]:
    """What new deliveries teach about Sentry projects (at most two statements, rows in key order):

    - a mapping's project id, from a delivery that reached it under its own slug with an id;
    - a rename, from a delivery that reached a mapping under another slug (``renamed_to``);
    - the issue → project index, from every delivery that pairs an issue with a project.

    A changed mapping row fires the mappings NOTIFY, so routers reload and route by the id at once.
    """
    mappings: dict[int, dict[str, object]] = {}
    issues: dict[tuple[int, str], dict[str, object]] = {}
    for e in events:
        if e.mapping_id is not None and e.project_slug and (e.renamed_from or e.project_id):
            renamed = e.renamed_from is not None
            mappings[e.mapping_id] = {"mapping_id": e.mapping_id, "project_id": e.project_id, "slug": e.project_slug,
                                      "renamed": renamed}  # fmt: skip
        org_id = org_ids.get(e.org)
        if org_id is not None and e.sentry_issue_id and e.project_slug:
            issues[(org_id, e.sentry_issue_id)] = {"org_id": org_id, "issue_id": e.sentry_issue_id,
                                                   "project_id": e.project_id, "slug": e.project_slug}  # fmt: skip
    writes: list[_Write] = []
    if mappings:
        writes.append((_LEARN_MAPPINGS, [mappings[k] for k in sorted(mappings)]))
    if issues:
        writes.append((_LEARN_ISSUES, [issues[k] for k in sorted(issues)]))
    return writes


def _first_per_key(events: Sequence[OutputEvent]) -> list[OutputEvent]:
    """One event per (delivery, project), in stream order: the first, or the first routed one when
    the delivery was ignored first and routed later (as the database upgrade would)."""
    first: dict[tuple[str, str | None], int] = {}
    out: list[OutputEvent] = []
    for event in events:
        key = (event.delivery_id, event.project_slug)
        at = first.get(key)
        if at is None:
            first[key] = len(out)
            out.append(event)
        elif out[at].outcome == "ignored" and event.outcome == "routed":
            out[at] = event
    return out


def _utc(moment: datetime) -> datetime:
    """Times without a zone are UTC (as :func:`_json` writes them), so all times compare."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _touch(event: RoutedEvent) -> Touch:
    return Touch(
        delivery_id=event.delivery_id,
        action=incident_action(event.resource, event.action, event.activity_type),
        seen_at=_utc(event.occurred_at or event.received_at),
        received_at=_utc(event.received_at),
        title=event.title or f"{event.resource} in {event.project_slug}",
        level=event.level,
        culprit=event.culprit,
        web_url=event.web_url,
        sentry_issue_id=event.sentry_issue_id,
        project_slug=event.project_slug,
    )


_CACHE_MAX = 100_000  # entries of each id cache below

# Service id → its organization's id (a service never moves; deleted ids are not reused).
_SERVICE_ORGS: dict[int, int] = {}


async def _foreign_services(
    session: AsyncSession, events: Sequence[OutputEvent], org_ids: dict[str, int]
) -> list[tuple[OutputEvent, str]]:
    """The routed events whose service belongs to another organization, with the reason (the tenant
    seal: the router never routes across orgs, so such a record is forged or corrupt). A service
    that does not exist is left to the database (foreign key: a poison record, as before)."""
    routed = [e for e in events if isinstance(e, RoutedEvent)]
    missing = {e.service_id for e in routed} - _SERVICE_ORGS.keys()
    if missing:
        rows = await session.execute(select(Service.id, Service.org_id).where(Service.id.in_(missing)))
        if len(_SERVICE_ORGS) > _CACHE_MAX:
            _SERVICE_ORGS.clear()
        _SERVICE_ORGS.update({service_id: org_id for service_id, org_id in rows})
    refused: list[tuple[OutputEvent, str]] = []
    for e in routed:
        owner = _SERVICE_ORGS.get(e.service_id)
        if owner is not None and owner != org_ids.get(e.org):
            refused.append((e, f"{TENANT_MISMATCH}: service {e.service_id} does not belong to organization {e.org}"))
    return refused


# Organization slug → id. An org's id never changes (orgs are not renamed or re-created), so ids
# found once are kept for the life of the process; only slugs not seen yet cost a query.
_ORG_IDS: dict[str, int] = {}


async def _org_ids(session: AsyncSession, slugs: set[str]) -> dict[str, int]:
    missing = slugs - _ORG_IDS.keys()
    if missing:
        rows = await session.execute(select(Organization.slug, Organization.id).where(Organization.slug.in_(missing)))
        if len(_ORG_IDS) > _CACHE_MAX:
            _ORG_IDS.clear()
        _ORG_IDS.update({slug: org_id for slug, org_id in rows})
    return {slug: _ORG_IDS[slug] for slug in slugs if slug in _ORG_IDS}


_STATE_COLUMNS = (
    INCIDENTS.c.status,
    INCIDENTS.c.event_count,
    INCIDENTS.c.title,
    INCIDENTS.c.level,
    INCIDENTS.c.first_seen_at,
    INCIDENTS.c.last_seen_at,
    INCIDENTS.c.resolved_at,
    INCIDENTS.c.culprit,
    INCIDENTS.c.web_url,
    INCIDENTS.c.sentry_issue_id,
    INCIDENTS.c.sentry_project_slug,
)
_STATE_NAMES = tuple(c.name for c in _STATE_COLUMNS)
assert _STATE_NAMES == IncidentState._fields, "IncidentState(*row) reads the columns in order"

_WANTED = _rows(INCIDENTS, ("service_id", "incident_key"))
_LOCK = _sql(
    select(INCIDENTS.c.id, INCIDENTS.c.service_id, INCIDENTS.c.incident_key, *_STATE_COLUMNS)
    .where(
        tuple_(INCIDENTS.c.service_id, INCIDENTS.c.incident_key).in_(
            select(_WANTED.c.service_id, _WANTED.c.incident_key)
        )
    )
    .order_by(INCIDENTS.c.service_id, INCIDENTS.c.incident_key)
    .with_for_update(key_share=True)
)
# Which of the batch's deliveries are already on the timelines of their (existing, locked) incidents.
_ON_TIMELINE = _sql(
    text(
        """
    SELECT e.incident_id, e.delivery_id
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(service_id bigint, incident_key text, delivery_id text)
    JOIN incidents AS i ON i.service_id = v.service_id AND i.incident_key = v.incident_key
    JOIN incident_events AS e ON e.incident_id = i.id AND e.delivery_id = v.delivery_id
    """
    )
)


async def _lock_incidents(
    conn: Driver, events: Sequence[RoutedEvent]
) -> tuple[dict[IncidentKey, _Locked], dict[int, frozenset[str]]]:
    """Lock the existing incidents of ``events`` (sorted: one lock order for all writers): their state,
    and the deliveries of ``events`` already on their timelines (the other project of a multi-project
    metric alert, written in an earlier batch: a delivery counts once per incident). One round trip."""
    keys = sorted({(e.service_id, e.incident_key or "") for e in events})
    deliveries = sorted({(e.service_id, e.incident_key or "", e.delivery_id) for e in events})
    lock_rows = [{"service_id": service_id, "incident_key": key} for service_id, key in keys]
    pair_rows = [{"service_id": s, "incident_key": k, "delivery_id": d} for s, k, d in deliveries]
    lock_params, pair_params = _json(lock_rows), _json(pair_rows)
    async with conn.pipeline():
        locked = await conn.execute(_LOCK, lock_params)
        on_timeline = await conn.execute(_ON_TIMELINE, pair_params)
    existing = {(r[1], r[2]): _Locked(int(r[0]), IncidentState(*r[3:])) for r in await locked.fetchall()}
    found: dict[int, set[str]] = {}
    for incident_id, delivery_id in await on_timeline.fetchall():
        found.setdefault(incident_id, set()).add(delivery_id)
    return existing, {incident_id: frozenset(d) for incident_id, d in found.items()}


# Audit columns copied from the event under the same name, then the whole column list.
_AUDIT_FROM_EVENT = (
    "delivery_id",
    "project_slug",
    "resource",
    "action",
    "outcome",
    "service_id",
    "mapping_id",
    "sentry_issue_id",
    "title",
    "received_at",
    "renamed_from",
    "replay_id",
)
_AUDIT_GET = operator.attrgetter(*_AUDIT_FROM_EVENT)
# What an ignored → routed upgrade takes from the new event.
_UPGRADED_COLUMNS = ("outcome", "reason", "service_id", "mapping_id", "incident_id", "renamed_from", "replay_id")
AUDIT_COLUMNS = (*_AUDIT_FROM_EVENT, "org_id", "org_slug", "reason", "raw_topic", "raw_partition", "raw_offset",
                  "incident_id", "flags")  # fmt: skip


def _insert_audit_statement() -> str:
    source = _rows(AUDIT, AUDIT_COLUMNS)
    insert_rows = insert(AUDIT).from_select(AUDIT_COLUMNS, select(*_select_all(source, AUDIT_COLUMNS)))
    # An ignored delivery that routes now (a mapping added or enabled since, found by a replay or a
    # redelivery), or a failed one replayed after the fix, is upgraded in place, keeping what it
    # was; any other existing record stays as is.
    upgrade: dict[str, Any] = {name: insert_rows.excluded[name] for name in _UPGRADED_COLUMNS}
    upgrade |= {"previous_outcome": AUDIT.c.outcome, "previous_reason": AUDIT.c.reason, "processed_at": func.now()}
    return _sql(
        insert_rows.on_conflict_do_update(
            index_elements=["delivery_id", "project_slug"],
            set_=upgrade,
            where=AUDIT.c.outcome.in_([_literal("ignored"), _literal("failed")])
            & (insert_rows.excluded.outcome == _literal("routed")),
        ).returning(AUDIT.c.id, AUDIT.c.delivery_id, AUDIT.c.project_slug)
    )


_INSERT_AUDIT = _insert_audit_statement()


async def _insert_audit(
    conn: Driver,
    events: Sequence[OutputEvent],
    org_ids: dict[str, int],
    existing: dict[IncidentKey, _Locked],
) -> list[tuple[int, OutputEvent]]:
    """Insert the audit records (sorted by key: one lock order for all writers); the new ones in stream order.

    A routed event whose incident exists is linked to it now (every event reaches an existing
    incident); links to incidents this batch opens are set by :func:`_apply_incidents`.
    """
    rows = sorted((_audit_row(e, org_ids.get(e.org), existing) for e in events), key=_audit_sort_key)
    returned = await _fetch(conn, _INSERT_AUDIT, rows)
    inserted = {(delivery_id, project): int(id_) for id_, delivery_id, project in returned}
    return [
        (inserted[(e.delivery_id, e.project_slug)], e) for e in events if (e.delivery_id, e.project_slug) in inserted
    ]


def _audit_sort_key(row: dict[str, object]) -> tuple[str, str]:
    return (str(row["delivery_id"]), str(row["project_slug"] or ""))


def _event_row(
    event: OutputEvent, names: tuple[str, ...], get: operator.attrgetter[Any], **columns: object
) -> dict[str, object]:
    """A row of ``event``'s attributes ``names`` (``get`` reads them) plus ``columns``."""
    row = dict(zip(names, get(event), strict=True))
    row.update(columns)
    return row


def _audit_row(event: OutputEvent, org_id: int | None, existing: dict[IncidentKey, _Locked]) -> dict[str, object]:
    routed_key = event.incident_key if isinstance(event, RoutedEvent) else None
    locked = existing.get((event.service_id or 0, routed_key)) if routed_key else None
    return _event_row(
        event,
        _AUDIT_FROM_EVENT,
        _AUDIT_GET,
        org_id=org_id,
        org_slug=event.org,
        reason=event.reason.value if isinstance(event, IgnoredEvent) else None,
        raw_topic=event.raw.topic,
        raw_partition=event.raw.partition,
        raw_offset=event.raw.offset,
        incident_id=locked.id if locked else None,
        flags=list(event.flags) or None,
    )


async def _apply_incidents(
    conn: Driver,
    groups: dict[IncidentKey, list[_New]],
    existing: dict[IncidentKey, _Locked],
    applied: dict[int, frozenset[str]],
    org_ids: dict[str, int],
    result: BatchResult,
) -> list[_Write]:
    """Fold each incident's new events; open the incidents that open now. Returns the statements
    that write the rest (state updates, timeline, links), for the batch's last round trip."""
    keys = sorted(groups)
    outcomes: dict[IncidentKey, Outcome] = {}
    for key in keys:
        locked = existing.get(key)
        touches = [n.touch for n in groups[key]]
        if locked is None:
            outcomes[key] = apply(None, touches)
        else:
            outcomes[key] = apply(locked.state, touches, applied.get(locked.id, frozenset()))

    ids = {key: locked.id for key, locked in existing.items()}
    ids.update(await _open(conn, groups, outcomes, existing, org_ids))
    writes: list[_Write] = []
    updates = _updates(ids, outcomes, existing)
    if updates:
        writes.append((_UPDATE, updates))

    timeline: list[dict[str, object]] = []
    links: list[dict[str, object]] = []
    for key in keys:
        outcome = outcomes[key]
        if key not in ids:
            continue
        first: dict[str, RoutedEvent] = {}
        for new in groups[key]:
            first.setdefault(new.event.delivery_id, new.event)
            if key not in existing and new.event.delivery_id in outcome.linked:
                links.append({"id": new.audit_id, "incident_id": ids[key]})
        for delivery, change in outcome.changes:
            timeline.append(_timeline_row(ids[key], first[delivery], change))
            if change is not Change.ATTACHED:
                result.changes[change.value] += 1
    if timeline:
        writes.append((_TIMELINE, timeline))
        result.timeline += len(timeline)
    if links:  # events of the incidents opened now (their audit records were written before)
        writes.append((_LINKS, links))
    return writes


_OPEN_NAMES = ("org_id", "service_id", "incident_key", *_STATE_NAMES)
_OPEN_SOURCE = _rows(INCIDENTS, _OPEN_NAMES)
_OPEN = _sql(
    insert(INCIDENTS)
    .from_select(_OPEN_NAMES, select(*_select_all(_OPEN_SOURCE, _OPEN_NAMES)))
    .on_conflict_do_nothing(index_elements=["service_id", "incident_key"])
    .returning(INCIDENTS.c.id, INCIDENTS.c.service_id, INCIDENTS.c.incident_key)
)


async def _open(
    conn: Driver,
    groups: dict[IncidentKey, list[_New]],
    outcomes: dict[IncidentKey, Outcome],
    existing: dict[IncidentKey, _Locked],
    org_ids: dict[str, int],
) -> dict[IncidentKey, int]:
    """Insert the incidents that open in this batch (sorted); their ids."""
    rows = []
    for key, outcome in sorted(outcomes.items()):
        if key in existing or outcome.after is None:
            continue
        service_id, incident_key = key
        org = groups[key][0].event.org
        rows.append(
            {
                **_state_values(outcome.after),
                "org_id": org_ids.get(org),
                "service_id": service_id,
                "incident_key": incident_key,
            }
        )
    if not rows:
        return {}
    opened = {(service_id, key): int(id_) for id_, service_id, key in await _fetch(conn, _OPEN, rows)}
    if len(opened) != len(rows):
        raise ConcurrentIncident(f"{len(rows) - len(opened)} incident(s) opened by another writer meanwhile")
    return opened


_UPDATE_NAMES = ("id", *_STATE_NAMES)
_UPDATE_SOURCE = _rows(INCIDENTS, _UPDATE_NAMES)
_UPDATE = _sql(
    update(INCIDENTS)
    .where(INCIDENTS.c.id == _UPDATE_SOURCE.c.id)
    .values({**{name: _UPDATE_SOURCE.c[name] for name in _STATE_NAMES}, "updated_at": func.now()})
)


def _updates(
    ids: dict[IncidentKey, int], outcomes: dict[IncidentKey, Outcome], existing: dict[IncidentKey, _Locked]
) -> list[dict[str, object]]:
    """The new state of the existing incidents the batch changed (sorted)."""
    return [
        {"id": ids[key], **_state_values(outcome.after)}
        for key, outcome in sorted(outcomes.items())
        if key in existing and outcome.after is not None and outcome.after != outcome.before
    ]


def _state_values(state: IncidentState) -> dict[str, object]:
    return state._asdict()


_TIMELINE_FROM_EVENT = (
    "delivery_id",
    "project_slug",
    "resource",
    "action",
    "title",
    "level",
    "event_id",
    "occurred_at",
    "received_at",
)
_TIMELINE_GET = operator.attrgetter(*_TIMELINE_FROM_EVENT)
_TIMELINE_COLUMNS = ("incident_id", "change", *_TIMELINE_FROM_EVENT)
_TIMELINE_SOURCE = _rows(TIMELINE, _TIMELINE_COLUMNS)
_TIMELINE = _sql(
    insert(TIMELINE)
    .from_select(_TIMELINE_COLUMNS, select(*_select_all(_TIMELINE_SOURCE, _TIMELINE_COLUMNS)))
    .on_conflict_do_nothing(index_elements=["incident_id", "delivery_id"])
)
_LINKS_SOURCE = _rows(AUDIT, ("id", "incident_id"))
_LINKS = _sql(update(AUDIT).where(AUDIT.c.id == _LINKS_SOURCE.c.id).values(incident_id=_LINKS_SOURCE.c.incident_id))


def _timeline_row(incident_id: int, event: RoutedEvent, change: Change) -> dict[str, object]:
    return _event_row(event, _TIMELINE_FROM_EVENT, _TIMELINE_GET, incident_id=incident_id, change=change.value)


@dataclass(frozen=True)
class Failure:
    """A record the writer could not apply (the database rejected it, or the tenant seal refused it),
    audited as ``failed`` with where its dead letter is. Values are cleaned to fit their columns."""

    delivery_id: str
    org: str
    reason: str  # tenant_mismatch | rejected | invalid_event
    error: str
    raw: tuple[str, int, int]  # the record's topic, partition, offset
    dlq: tuple[int, int]  # its dead letter's partition and offset
    received_at: datetime | None = None
    project_slug: str | None = None
    resource: str = "unknown"
    action: str = "unknown"
    sentry_issue_id: str | None = None
    title: str | None = None


_FAILED_COLUMNS = (
    "delivery_id", "project_slug", "org_id", "org_slug", "resource", "action", "outcome", "reason", "error",
    "sentry_issue_id", "title", "received_at", "raw_topic", "raw_partition", "raw_offset", "dlq_partition",
    "dlq_offset",
)  # fmt: skip
_INT32 = 2**31 - 1


async def write_failures(session: AsyncSession, failures: Sequence[Failure]) -> int:
    """Audit ``failures`` as ``failed`` (one statement; an existing record for the key stays). Returns
    how many were new."""
    org_ids = await _org_ids(session, {f.org for f in failures})
    now = datetime.now(UTC)
    rows: list[dict[str, object]] = []
    for f in failures:
        received = f.received_at if f.received_at and abs(now - f.received_at) < timedelta(days=3650) else now
        rows.append(
            {
                "delivery_id": clean(f.delivery_id, 64) or "unknown",
                "project_slug": clean(f.project_slug, 100),
                "org_id": org_ids.get(f.org),
                "org_slug": clean(f.org, 100) or "unknown",
                "resource": clean(f.resource, 64) or "unknown",
                "action": clean(f.action, 64) or "unknown",
                "outcome": "failed",
                "reason": f.reason,
                "error": clean(f.error, 1000),
                "sentry_issue_id": clean(f.sentry_issue_id, 64),
                "title": clean(f.title, 1000),
                "received_at": received,
                "raw_topic": clean(f.raw[0], 249) or "unknown",
                "raw_partition": f.raw[1] if 0 <= f.raw[1] <= _INT32 else -1,
                "raw_offset": f.raw[2] if 0 <= f.raw[2] < 2**63 else -1,
                "dlq_partition": f.dlq[0],
                "dlq_offset": f.dlq[1],
            }
        )
    source = _rows(AUDIT, _FAILED_COLUMNS)
    stmt = (
        insert(AUDIT)
        .from_select(_FAILED_COLUMNS, select(*_select_all(source, _FAILED_COLUMNS)))
        .on_conflict_do_nothing(index_elements=["delivery_id", "project_slug"])
        .returning(AUDIT.c.id)
    )
    result = await session.execute(stmt, _json(sorted(rows, key=_audit_sort_key)))
    return len(result.all())
