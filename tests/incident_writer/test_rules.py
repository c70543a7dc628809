"""The writer's pure decisions, without Kafka or Postgres: incident folding, poison isolation, decoding."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from incident_writer.consumer import Item, decode, retry_reason, split
from incident_writer.incidents import Change, IncidentAction, IncidentState, Touch, apply
from incident_writer.isolate import Poison, write_isolating
from incident_writer.store import ConcurrentIncident, poison_reason
from shared.consumer import Batch

T0 = datetime(2026, 11, 1, tzinfo=UTC)
OCC, RES, REOPEN, ARCHIVE, ATTACH = (
    IncidentAction.OCCURRENCE,
    IncidentAction.RESOLVE,
    IncidentAction.REOPEN,
    IncidentAction.ARCHIVE,
    IncidentAction.ATTACH,
)


def touch(delivery: str, action: IncidentAction = OCC, minute: int = 0, level: str | None = "error") -> Touch:
    at = T0 + timedelta(minutes=minute)
    return Touch(
        delivery_id=delivery,
        action=action,
        seen_at=at,
        received_at=at + timedelta(seconds=5),
        title=f"title {delivery}",
        level=level,
        web_url=f"https://sentry.io/{delivery}",
    )


def state(**changes: object) -> IncidentState:
    base = IncidentState(
        status="open",
        event_count=3,
        title="existing",
        level="warning",
        first_seen_at=T0,
        last_seen_at=T0 + timedelta(minutes=10),
        resolved_at=None,
        culprit=None,
        web_url=None,
        sentry_issue_id="1",
        sentry_project_slug="proj",
    )
    return base._replace(**changes)  # type: ignore[arg-type]


def test_first_occurrence_opens_with_the_events_fields() -> None:
    outcome = apply(None, [touch("a", minute=5, level="warning")])
    assert outcome.after is not None
    assert (outcome.after.status, outcome.after.event_count, outcome.after.title) == ("open", 1, "title a")
    assert outcome.after.first_seen_at == outcome.after.last_seen_at == T0 + timedelta(minutes=5)
    assert outcome.after.level == "warning" and outcome.after.web_url == "https://sentry.io/a"
    assert outcome.changes == (("a", Change.OPENED),)
    assert outcome.linked == {"a"}


def test_later_occurrences_count_and_escalate_but_never_lower_the_level() -> None:
    outcome = apply(
        None, [touch("a", minute=5), touch("b", minute=1, level="fatal"), touch("c", minute=9, level="info")]
    )
    assert outcome.after is not None
    assert outcome.after.event_count == 3
    assert outcome.after.level == "fatal"
    assert outcome.after.first_seen_at == T0 + timedelta(minutes=1)
    assert outcome.after.last_seen_at == T0 + timedelta(minutes=9)
    assert outcome.after.web_url == "https://sentry.io/a"  # the first one stays
    assert [c for _, c in outcome.changes] == [Change.OPENED, Change.UPDATED, Change.UPDATED]


def test_resolve_and_reopen() -> None:
    outcome = apply(state(), [touch("r", RES), touch("u", REOPEN), touch("r2", RES)])
    assert outcome.after is not None and outcome.after.status == "resolved"
    assert outcome.after.resolved_at == T0 + timedelta(seconds=5)
    assert outcome.after.event_count == 3  # lifecycle actions are not occurrences
    assert [c for _, c in outcome.changes] == [Change.RESOLVED, Change.REOPENED, Change.RESOLVED]


def test_a_new_occurrence_reopens_a_resolved_incident() -> None:
    outcome = apply(state(status="resolved", resolved_at=T0), [touch("x", minute=20)])
    assert outcome.after is not None
    assert (outcome.after.status, outcome.after.resolved_at, outcome.after.event_count) == ("open", None, 4)
    assert outcome.changes == (("x", Change.REOPENED),)


def test_an_occurrence_from_before_the_resolution_counts_without_reopening() -> None:
    """Replays apply events by their original time: an old occurrence does not reopen."""
    resolved = state(status="resolved", resolved_at=T0 + timedelta(minutes=30))
    outcome = apply(resolved, [touch("old", minute=20)])
    assert outcome.after is not None
    assert (outcome.after.status, outcome.after.event_count) == ("resolved", 4)
    assert outcome.after.resolved_at == T0 + timedelta(minutes=30)
    assert outcome.changes == (("old", Change.UPDATED),)
    later = apply(resolved, [touch("new", minute=31)])
    assert later.after is not None and later.after.status == "open" and later.changes == (("new", Change.REOPENED),)


def test_repeated_lifecycle_actions_only_attach() -> None:
    outcome = apply(state(), [touch("u", REOPEN)])
    assert outcome.after == outcome.before and outcome.changes == (("u", Change.ATTACHED),)
    outcome = apply(state(status="resolved", resolved_at=T0), [touch("r", RES)])
    assert outcome.after == outcome.before and outcome.changes == (("r", Change.ATTACHED),)


def test_archive_mutes_until_unresolved() -> None:
    """archive → occurrence → unresolved walks archived → archived (count + 1) → open."""
    outcome = apply(state(), [touch("a", ARCHIVE), touch("x", minute=20), touch("u", REOPEN)])
    assert [c for _, c in outcome.changes] == [Change.ARCHIVED, Change.UPDATED, Change.REOPENED]
    assert outcome.after is not None and (outcome.after.status, outcome.after.event_count) == ("open", 4)
    muted = apply(state(status="archived"), [touch("x", minute=20)])
    assert muted.after is not None and (muted.after.status, muted.after.event_count) == ("archived", 4)
    assert muted.after.last_seen_at == T0 + timedelta(minutes=20)


def test_archived_and_resolved_move_between_each_other() -> None:
    outcome = apply(state(status="archived"), [touch("r", RES), touch("a", ARCHIVE), touch("a2", ARCHIVE)])
    assert [c for _, c in outcome.changes] == [Change.RESOLVED, Change.ARCHIVED, Change.ATTACHED]
    assert outcome.after is not None and (outcome.after.status, outcome.after.resolved_at) == ("archived", None)


def test_an_archive_before_any_occurrence_changes_nothing() -> None:
    outcome = apply(None, [touch("a", ARCHIVE)])
    assert outcome.after is None and outcome.changes == ()


def test_comments_attach_to_an_existing_incident_only() -> None:
    existing = apply(state(), [touch("c", ATTACH)])
    assert existing.after == existing.before and existing.changes == (("c", Change.ATTACHED),)
    assert existing.linked == {"c"}
    nothing = apply(None, [touch("c", ATTACH), touch("r", RES), touch("u", REOPEN)])
    assert nothing.after is None and nothing.changes == () and nothing.linked == frozenset()


def test_events_before_the_first_occurrence_do_nothing_and_later_ones_apply() -> None:
    outcome = apply(None, [touch("c", ATTACH), touch("o"), touch("r", RES), touch("c2", ATTACH)])
    assert outcome.after is not None and outcome.after.status == "resolved"
    assert [d for d, _ in outcome.changes] == ["o", "r", "c2"]
    assert outcome.linked == {"o", "r", "c2"}


def test_a_delivery_takes_effect_once() -> None:
    # the same delivery twice (two projects of one metric alert on one service) and one applied before
    outcome = apply(state(), [touch("m"), touch("m"), touch("old")], applied=frozenset({"old"}))
    assert outcome.after is not None and outcome.after.event_count == 4
    assert outcome.changes == (("m", Change.UPDATED),)
    assert outcome.linked == {"m", "old"}


def test_nothing_new_changes_nothing() -> None:
    outcome = apply(state(), [touch("a"), touch("b", RES)], applied=frozenset({"a", "b"}))
    assert outcome.after == outcome.before and outcome.changes == ()


# --- poison isolation -------------------------------------------------------------------------


class Bad(Exception):
    pass


def writer_failing_on(poison: set[int], calls: list[list[int]]) -> Callable[[Sequence[int]], Awaitable[list[int]]]:
    async def write(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if poison & set(items):
            raise Bad("constraint")
        return list(items)

    return write


def bad_reason(exc: Exception) -> str | None:
    return "bad record" if isinstance(exc, Bad) else None


@pytest.mark.parametrize("poison", [set(), {0}, {13}, {31}, {3, 4}, {0, 31}, set(range(32))])
async def test_isolation_writes_everything_but_the_poison_in_order(poison: set[int]) -> None:
    calls: list[list[int]] = []
    written, dead = await write_isolating(list(range(32)), writer_failing_on(poison, calls), bad_reason)
    assert [i for batch in written for i in batch] == [i for i in range(32) if i not in poison]
    assert dead == [Poison(i, "bad record") for i in sorted(poison)]
    if not poison:
        assert calls == [list(range(32))]
    if len(poison) == 1:
        assert len(calls) <= 2 * 5 + 1  # log2(32) levels, two halves each, plus the first try


async def test_isolation_stops_at_an_error_that_is_not_the_records_fault() -> None:
    async def write(items: Sequence[int]) -> None:
        raise ConnectionError("database went away")

    with pytest.raises(ConnectionError):
        await write_isolating([1, 2, 3], write, bad_reason)


def _db_error(kind: type[Exception], orig: Exception) -> Exception:
    return kind("INSERT …", {}, orig)


def test_poison_reason_names_constraint_and_data_errors_only() -> None:
    fk = psycopg.errors.ForeignKeyViolation('insert or update on table "incidents" violates foreign key\nDETAIL: …')
    assert poison_reason(_db_error(IntegrityError, fk)) == (
        'ForeignKeyViolation: insert or update on table "incidents" violates foreign key'
    )
    too_long = psycopg.errors.StringDataRightTruncation("value too long for type character varying(100)")
    assert poison_reason(_db_error(DataError, too_long)) is not None
    down = psycopg.OperationalError("connection refused")
    assert poison_reason(_db_error(OperationalError, down)) is None
    assert poison_reason(TimeoutError()) is None


def test_retry_reasons() -> None:
    deadlock = _db_error(OperationalError, psycopg.errors.DeadlockDetected("deadlock detected"))
    assert retry_reason(deadlock) == "conflict"
    assert retry_reason(ConcurrentIncident("x")) == "conflict"
    assert retry_reason(TimeoutError()) == "timeout"
    assert retry_reason(_db_error(OperationalError, psycopg.OperationalError("refused"))) == "database"


# --- decoding ---------------------------------------------------------------------------------


def record(value: bytes | None, offset: int, key: bytes | None = b"k", partition: int = 0) -> ConsumerRecord:
    return ConsumerRecord(
        topic="t",
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=len(value or b""),
        headers=[],
    )


def test_decode_keeps_stream_order_and_names_what_is_wrong() -> None:
    good = (
        b'{"delivery_id":"d","org":"o","resource":"issue","action":"created","project_slug":"p",'
        b'"received_at":"2026-11-01T00:00:00Z","raw":{"topic":"r","partition":0,"offset":1},'
        b'"outcome":"routed","service_id":1,"mapping_id":2}'
    )
    batch = {TopicPartition("t", 0): [record(good, 0), record(b"{not json", 1), record(None, 2), record(good, 3)]}
    items, invalid = decode(Batch(batch))
    assert [i.record.offset for i in items] == [0, 3]
    assert [r.offset for r, _ in invalid] == [1, 2]
    assert all(error.startswith("invalid event: ") for _, error in invalid)


# --- splitting a batch into parallel transactions -------------------------------------------------


def items_of(keys: list[bytes | None], partitions: int = 6) -> list[Item]:
    """One item a key, in this order, spread over ``partitions`` (the events do not matter to the split)."""
    event = decode(Batch({TopicPartition("t", 0): [record(GOOD, 0)]}))[0][0].event
    return [Item(record(GOOD, offset, key, offset % partitions), event) for offset, key in enumerate(keys)]


GOOD = (
    b'{"delivery_id":"d","org":"o","resource":"issue","action":"created","project_slug":"p",'
    b'"received_at":"2026-11-01T00:00:00Z","raw":{"topic":"r","partition":0,"offset":1},'
    b'"outcome":"routed","service_id":1,"mapping_id":2}'
)


def test_a_small_batch_is_one_transaction() -> None:
    items = items_of([str(i).encode() for i in range(9)])
    assert split(items, parts=4, min_events=5) == [items]  # 9 // 5 = 1 part
    assert split(items, parts=1, min_events=1) == [items]


def test_a_large_batch_is_split_by_key_each_part_in_stream_order() -> None:
    keys: list[bytes | None] = [f"issue-{i % 40}".encode() for i in range(400)] + [None] * 12
    items = items_of(keys)
    parts = split(items, parts=4, min_events=50)
    assert len(parts) == 4
    assert all(len(part) >= 50 for part in parts), [len(p) for p in parts]
    # Every item exactly once; each part in the batch's order.
    assert sorted(i.record.offset for part in parts for i in part) == list(range(len(items)))
    for part in parts:
        offsets = [i.record.offset for i in part]
        assert offsets == sorted(offsets)
    # A key's records (whatever their partition) are in one part.
    home = {i.record.key: n for n, part in enumerate(parts) for i in part if i.record.key is not None}
    assert all(home[i.record.key] == n for n, part in enumerate(parts) for i in part if i.record.key is not None)
    assert len({i.record.partition for part in parts for i in part if i.record.key == b"issue-7"}) > 1


def test_the_parts_never_outnumber_min_events_allows() -> None:
    items = items_of([str(i).encode() for i in range(120)])
    assert len(split(items, parts=8, min_events=50)) == 2
