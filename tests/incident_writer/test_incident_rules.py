"""Which incident change an event makes, and level escalation: pure rules."""

from __future__ import annotations

import pytest

from incident_writer.incidents import IncidentAction, escalate, incident_action


@pytest.mark.parametrize(
    ("resource", "action", "expected"),
    [
        ("issue", "created", IncidentAction.OCCURRENCE),
        ("error", "created", IncidentAction.OCCURRENCE),
        ("event_alert", "triggered", IncidentAction.OCCURRENCE),
        ("metric_alert", "critical", IncidentAction.OCCURRENCE),
        ("metric_alert", "warning", IncidentAction.OCCURRENCE),
        ("legacy_webhook", "triggered", IncidentAction.OCCURRENCE),
        ("issue", "resolved", IncidentAction.RESOLVE),
        ("metric_alert", "resolved", IncidentAction.RESOLVE),
        ("issue", "unresolved", IncidentAction.REOPEN),
        ("issue", "ignored", IncidentAction.ARCHIVE),
        ("issue", "archived", IncidentAction.ARCHIVE),
        ("issue", "assigned", IncidentAction.ATTACH),
        ("comment", "created", IncidentAction.ATTACH),
        ("seer", "root_cause_completed", IncidentAction.ATTACH),
        ("brand_new", "created", IncidentAction.ATTACH),
    ],
)
def test_incident_action(resource: str, action: str, expected: IncidentAction) -> None:
    assert incident_action(resource, action) is expected


@pytest.mark.parametrize(
    ("activity_type", "expected"),
    [
        ("status_resolved", IncidentAction.RESOLVE),
        ("status_resolved_in_release", IncidentAction.RESOLVE),
        ("status_resolved_by_age", IncidentAction.RESOLVE),
        ("status_resolved_in_commit", IncidentAction.RESOLVE),
        ("status_unresolved", IncidentAction.REOPEN),
        ("status_regression", IncidentAction.REOPEN),
        ("status_escalating", IncidentAction.REOPEN),
        ("status_ignored", IncidentAction.ARCHIVE),
        ("appeared_in_pull_request", IncidentAction.ATTACH),
        ("seer_root_cause_completed", IncidentAction.ATTACH),
        (None, IncidentAction.ATTACH),
    ],
)
def test_activity_alerts_act_by_activity_type(activity_type: str | None, expected: IncidentAction) -> None:
    assert incident_action("activity_alert", "triggered", activity_type) is expected


@pytest.mark.parametrize(
    ("current", "new", "expected"),
    [
        ("warning", "error", "error"),
        ("error", "warning", "error"),
        ("error", "fatal", "fatal"),
        (None, "info", "info"),
        ("error", None, "error"),
        ("error", "weird", "error"),
    ],
)
def test_level_only_escalates(current: str | None, new: str | None, expected: str | None) -> None:
    assert escalate(current, new) == expected
