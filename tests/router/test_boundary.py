"""The boundary check, without Kafka or Postgres: every value the writer stores can be read back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from router.boundary import TEXT_CLEANED, TIME_OUT_OF_RANGE, TimeWindow, sanitize
from shared.sentry import ParsedWebhook, ProjectRef, parse_webhook
from shared.storable import clean
from tests.support.sentry import payload

RECEIVED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
WINDOW = TimeWindow.of(365, 24)


def test_a_time_past_year_9999_in_utc_is_replaced_by_the_receipt_and_flagged() -> None:
    body = payload("issue.created")
    body["data"]["issue"]["lastSeen"] = "9999-12-31T23:59:59-14:00"  # year 10000 once in UTC
    parsed = parse_webhook("issue", body)
    assert parsed.occurred_at is not None
    clean_parsed, flags = sanitize(parsed, RECEIVED, WINDOW)
    assert clean_parsed.occurred_at == RECEIVED and flags == (TIME_OUT_OF_RANGE,)


def test_the_window_is_a_year_before_and_a_day_after() -> None:
    for offset, kept in [
        (timedelta(days=-364), True),
        (timedelta(hours=23), True),
        (timedelta(days=-366), False),
        (timedelta(hours=25), False),
    ]:
        parsed = ParsedWebhook(resource="error", action="created", occurred_at=RECEIVED + offset)
        out, flags = sanitize(parsed, RECEIVED, WINDOW)
        assert (out.occurred_at == RECEIVED + offset) is kept and (flags == ()) is kept, offset


def test_unstorable_characters_are_removed_from_every_string_and_flagged() -> None:
    parsed = ParsedWebhook(
        resource="issue",
        action="created",
        projects=(ProjectRef("web", "45\x0005"),),
        sentry_issue_id="12\x0034",
        event_id="ab\ud800cd",
        title="Boom\x00!",
        culprit="\x00",
    )
    out, flags = sanitize(parsed, RECEIVED, WINDOW)
    assert flags == (TEXT_CLEANED,)
    assert (out.sentry_issue_id, out.event_id, out.title, out.culprit) == ("1234", "abcd", "Boom!", None)
    assert out.projects == (ProjectRef("web", "4505"),)
    # Every delivery of the issue is cleaned alike: one Sentry issue stays one incident.
    assert sanitize(parsed, RECEIVED + timedelta(minutes=5), WINDOW)[0].incident_key == out.incident_key == "issue:1234"


def test_clean_values_pass_unchanged() -> None:
    parsed = parse_webhook("issue", payload("issue.created"))
    parsed = parsed.model_copy(update={"occurred_at": RECEIVED})
    out, flags = sanitize(parsed, RECEIVED, WINDOW)
    assert out is parsed and flags == ()
    assert clean(None) is None and clean("x" * 100, 64) == "x" * 64


@pytest.mark.parametrize(
    "field",
    ["title", "level", "culprit", "web_url", "activity_type", "sentry_issue_id", "alert_identifier", "event_id"],
)
def test_each_string_field_alone_is_cleaned(field: str) -> None:
    """One dirty field among clean ones is found (the clean case is checked in one scan)."""
    parsed = parse_webhook("issue", payload("issue.created")).model_copy(
        update={"occurred_at": RECEIVED, field: "a\x00b"}
    )
    out, flags = sanitize(parsed, RECEIVED, WINDOW)
    assert getattr(out, field) == "ab" and flags == (TEXT_CLEANED,)


def test_an_overlong_id_is_cut_and_flagged() -> None:
    parsed = ParsedWebhook(resource="issue", action="created", sentry_issue_id="9" * 65)
    out, flags = sanitize(parsed, RECEIVED, WINDOW)
    assert out.sentry_issue_id == "9" * 64 and flags == (TEXT_CLEANED,)
