"""Every real Sentry body of the team's corpus parses and classifies as the fact sheet says."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared.events import IgnoredEvent, RawRef, Reason, RoutedEvent, encode_event, event_fields
from shared.sentry import (
    SENTRY_FIELDS,
    ParsedWebhook,
    is_valid_slug,
    parse_webhook,
    partition_key,
    project_from_api_url,
)
from tests.support.sentry import payloads_dir

# file → (resource, action, project slugs, project ids, sentry issue id, alert identifier, event id)
EXPECTED: dict[str, tuple[str, str, list[str], list[str | None], str | None, str | None, str | None]] = {
    "comment.created.json": ("comment", "created", ["sentry"], [None], "100", None, None),
    "error.created.json": (
        "error", "created", ["front-end"], ["1"], "1170820242", None, "bb78c1407cea4519aa397afc059c793d"
    ),
    "event_alert.triggered.json": (
        "event_alert", "triggered", ["front-end"], ["1"], "1117540176", None, "e4874d664c3540c1a32eab185f12c5ab",
    ),
    "installation.created.json": ("installation", "created", [], [], None, None, None),
    "issue.created.json": ("issue", "created", ["front-end"], ["1"], "1170820242", None, None),
    "legacy_webhook_plugin.json": (
        "legacy_webhook", "triggered", ["python"], [None], "4616132096", None, "d432ae7c01c640b597831fb1710e3413",
    ),
    "legacy_webhook_plugin.sentry9.json": (
        "legacy_webhook", "triggered", ["alerta5"], [None], "541485531", None, "0476467adf8f499ea795a48fcc4bf290"
    ),
    "metric_alert.resolved.json": ("metric_alert", "resolved", ["bar"], [None], None, "1", None),
    "preprod_artifact.build_distribution_completed.json": (
        "preprod_artifact", "build_distribution_completed", ["my-project"], [None], None, None, None
    ),
    "preprod_artifact.size_analysis_completed.json": (
        "preprod_artifact", "size_analysis_completed", ["my-project"], [None], None, None, None
    ),
    "seer.coding_completed.json": ("seer", "coding_completed", [], [], "1170820242", None, None),
    "seer.coding_started.json": ("seer", "coding_started", [], [], "1170820242", None, None),
    "seer.pr_created.json": ("seer", "pr_created", [], [], "1170820242", None, None),
    "seer.root_cause_completed.json": ("seer", "root_cause_completed", [], [], "1170820242", None, None),
    "seer.root_cause_started.json": ("seer", "root_cause_started", [], [], "1170820242", None, None),
    "seer.solution_completed.json": ("seer", "solution_completed", [], [], "1170820242", None, None),
    "seer.solution_started.json": ("seer", "solution_started", [], [], "1170820242", None, None),
    "example-app-mocks/comment.created.json": ("comment", "created", ["ipe"], [None], "123", None, None),
    "example-app-mocks/comment.deleted.json": ("comment", "deleted", ["ipe"], [None], "123", None, None),
    "example-app-mocks/comment.updated.json": ("comment", "updated", ["ipe"], [None], "123", None, None),
    # The mocks' events carry no API url: the project slug is not there (typed "no project").
    "example-app-mocks/event_alert.triggered.json": ("event_alert", "triggered", [], [], "123", None, "def456"),
    "example-app-mocks/event_alert.triggered.with_alert_rule_action.json": (
        "event_alert", "triggered", [], [], "123", None, "def456"
    ),
    "example-app-mocks/installation.created.json": ("installation", "created", [], [], None, None, None),
    "example-app-mocks/installation.deleted.json": ("installation", "deleted", [], [], None, None, None),
    "example-app-mocks/issue.assigned.json": ("issue", "assigned", ["ipe"], ["456"], "123", None, None),
    "example-app-mocks/issue.created.json": ("issue", "created", ["ipe"], ["456"], "123", None, None),
    "example-app-mocks/issue.ignored.json": ("issue", "ignored", ["ipe"], ["456"], "123", None, None),
    "example-app-mocks/issue.resolved.json": ("issue", "resolved", ["ipe"], ["456"], "123", None, None),
    "example-app-mocks/metric_alert.critical.json": ("metric_alert", "critical", [], [], None, "789", None),
    "example-app-mocks/metric_alert.critical.with_alert_rule_action.json": (
        "metric_alert", "critical", [], [], None, "789", None
    ),
    "example-app-mocks/metric_alert.resolved.json": ("metric_alert", "resolved", [], [], None, "789", None),
    "example-app-mocks/metric_alert.warning.json": ("metric_alert", "warning", [], [], None, "789", None),
    "example-app-mocks/metric_alert.warning.with_alert_rule_action.json": (
        "metric_alert", "warning", [], [], None, "789", None
    ),
    "sentry-test-fixtures/activity_alert.triggered.data.json": (
        "activity_alert", "triggered", ["my-proj"], ["42"], "123456", None, None
    ),
    "sentry-test-fixtures/comment.created.data.json": ("comment", "created", ["my-proj"], [None], "123456", None, None),
    "sentry-test-fixtures/error.created.data.json": (
        "error", "created", [], [], "123456", None, "9b3d8a3b2a5f4b1c8e6d0a1f2c3b4a5e"
    ),
    "sentry-test-fixtures/event_alert.triggered.data.json": (
        "event_alert", "triggered", [], [], "123456", None, "abc1230000000000000000000000abcd"
    ),
    "sentry-test-fixtures/installation.created.data.json": ("installation", "created", [], [], None, None, None),
    "sentry-test-fixtures/issue.created.data.json": ("issue", "created", ["my-proj"], ["42"], "123456", None, None),
    "sentry-test-fixtures/metric_alert.critical.data.json": (
        "metric_alert", "critical", ["my-proj"], [None], None, "1", None
    ),
    "sentry-test-fixtures/preprod_artifact.size_analysis_completed.data.json": (
        "preprod_artifact", "size_analysis_completed", ["my-proj"], [None], None, None, None
    ),
    "sentry-test-fixtures/seer.root_cause_started.data.json": ("seer", "root_cause_started", [], [], "123456", None, None),
}  # fmt: skip


def corpus_files() -> list[str]:
    root = payloads_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.json"))


def load(name: str) -> tuple[str, Any]:
    """(resource, body) for a corpus file; the test fixtures hold only ``data`` and get their envelope."""
    path = payloads_dir() / name
    body = json.loads(path.read_bytes())
    base = Path(name).name
    if base.startswith("legacy_webhook_plugin"):
        return "legacy_webhook", body
    resource, action = base.split(".")[:2]
    if name.startswith("sentry-test-fixtures/"):
        body = {"action": action, "data": body}
    return resource, body


def test_every_corpus_file_has_expectations() -> None:
    assert corpus_files() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file_parses_as_expected(name: str) -> None:
    resource, body = load(name)
    parsed = parse_webhook(resource, body)
    slugs, ids = [p.slug for p in parsed.projects], [p.id for p in parsed.projects]
    got = (
        parsed.resource, parsed.action, slugs, ids, parsed.sentry_issue_id, parsed.alert_identifier,
        parsed.event_id,
    )  # fmt: skip
    assert got == EXPECTED[name]
    assert parsed.known_resource


def test_issue_details() -> None:
    parsed = parse_webhook(*load("issue.created.json"))
    assert parsed.title == "ReferenceError: blooopy is not defined"
    assert parsed.level == "error"
    assert parsed.culprit == "?(runner)"
    assert parsed.occurred_at == datetime(2019, 8, 19, 20, 58, 37, 391000, tzinfo=UTC)
    assert parsed.incident_key == "issue:1170820242"


def test_metric_alert_details() -> None:
    parsed = parse_webhook(*load("metric_alert.resolved.json"))
    assert parsed.title == "Resolved: Too many errors"
    assert parsed.web_url == "https://sentry.io/organizations/baz/alerts/1/"
    assert parsed.incident_key == "metric_alert:1"


def test_event_alert_epoch_fallback_and_title() -> None:
    parsed = parse_webhook(*load("event_alert.triggered.json"))
    assert parsed.title == "ReferenceError: heck is not defined"
    assert parsed.occurred_at is not None and parsed.occurred_at.year == 2019


def test_metric_alert_names_several_projects_once_each() -> None:
    body = {"action": "critical", "data": {"metric_alert": {"identifier": "7", "projects": ["a-1", "b-2", "a-1", "9"]}}}
    parsed = parse_webhook("metric_alert", body)
    assert [p.slug for p in parsed.projects] == ["a-1", "b-2"]  # "9" is all digits: not a slug


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "text",
        42,
        {"data": None},
        {"data": {"issue": "not an object"}},
        {"data": {"issue": {"project": {"slug": 5, "id": ["x"]}, "id": {"no": 1}}}},
        {"data": {"issue": {"project": {"slug": "UPPER"}}}},
        {"action": ["x"], "data": {"issue": {"project": {"slug": "x" * 101}}}},
    ],
)
def test_malformed_shapes_give_no_project_not_exceptions(body: object) -> None:
    parsed = parse_webhook("issue", body)
    assert parsed.projects == ()
    assert isinstance(parsed, ParsedWebhook)


def test_huge_strings_are_truncated_and_non_ascii_kept() -> None:
    body = {"action": "created", "data": {"issue": {"id": "1", "title": "é" * 100_000, "project": {"slug": "p"}}}}
    parsed = parse_webhook("issue", body)
    assert parsed.title is not None and len(parsed.title) == 1000 and parsed.title[0] == "é"


def test_short_id_recovers_slug() -> None:
    parsed = parse_webhook("issue", {"action": "created", "data": {"issue": {"id": "5", "shortId": "PAY-API-12"}}})
    assert [p.slug for p in parsed.projects] == ["pay-api"]


def test_unknown_resource_is_typed_not_an_error() -> None:
    parsed = parse_webhook("brand_new_thing", {"action": "happened", "data": {"x": 1}})
    assert parsed.action == "happened" and not parsed.known_resource and parsed.projects == ()


@pytest.mark.parametrize(
    ("url", "slug"),
    [
        ("https://sentry.io/api/0/projects/acme/payments-api/events/abc/", "payments-api"),
        ("https://acme.sentry.io/api/0/projects/acme/web/events/abc/", "web"),
        ("https://sentry.example.com/api/0/projects/acme/Bad_Slug/events/abc/", None),
        ("not a url", None),
    ],
)
def test_project_from_api_url(url: str, slug: str | None) -> None:
    assert project_from_api_url(url) == slug


@pytest.mark.parametrize(
    ("slug", "ok"),
    [
        ("frontend", True),
        ("a_b-1", True),
        ("123", False),
        ("", False),
        ("A", False),
        ("x" * 100, True),
        ("x" * 101, False),
        ("web\n", False),
        ("123\n", False),
    ],
)
def test_slug_rule(slug: str, ok: bool) -> None:
    assert is_valid_slug(slug) is ok


def test_partition_key_prefers_issue_then_project_then_org() -> None:
    assert partition_key("o", parse_webhook(*load("issue.created.json"))) == "o/1170820242"
    assert partition_key("o", parse_webhook(*load("preprod_artifact.size_analysis_completed.json"))) == "o/my-project"
    assert partition_key("o", parse_webhook(*load("installation.created.json"))) == "o"


def test_routed_and_ignored_events_carry_every_sentry_field_the_parser_finds() -> None:
    parsed = parse_webhook("issue", load("issue.created.json")[1])
    assert set(SENTRY_FIELDS) <= set(RoutedEvent.model_fields) & set(IgnoredEvent.model_fields)
    fields = event_fields(parsed, delivery="d", org="o", project_slug="p", project_id=None,
                          received_at=datetime.now(UTC), raw=RawRef(topic="t", partition=0, offset=0))  # fmt: skip
    assert {name: fields[name] for name in SENTRY_FIELDS} == {name: getattr(parsed, name) for name in SENTRY_FIELDS}
    assert fields["incident_key"] == "issue:1170820242"


def test_activity_alert_carries_its_activity_type() -> None:
    resource, body = load("sentry-test-fixtures/activity_alert.triggered.data.json")
    parsed = parse_webhook(resource, body)
    assert parsed.activity_type == "seer_root_cause_completed" and parsed.sentry_issue_id == "123456"
    body["data"]["activity"] = {"type": "status_resolved_in_release"}
    assert parse_webhook(resource, body).activity_type == "status_resolved_in_release"
    assert parse_webhook("issue", body).activity_type is None


@pytest.mark.parametrize("name", corpus_files())
@pytest.mark.parametrize("model", [RoutedEvent, IgnoredEvent])
def test_encoded_events_equal_pydantics_dump_over_the_corpus(
    name: str, model: type[RoutedEvent | IgnoredEvent]
) -> None:
    """The router's ``encode_event`` (no model built) writes what ``model(**fields).model_dump_json()``
    writes, and the writer's validation reads it back to the same event."""
    resource, body = load(name)
    parsed = parse_webhook(resource, body)
    project = parsed.projects[0] if parsed.projects else None
    fields: dict[str, Any] = event_fields(
        parsed,
        delivery="d" * 64,
        org="acme",
        project_slug=project.slug if project else None,
        project_id=project.id if project else None,
        received_at=datetime(2026, 12, 1, 6, 30, 0, 123456, tzinfo=UTC),
        raw=RawRef(topic="sentry.webhooks.raw", partition=3, offset=42),
    )
    fields.update(flags=("text_cleaned",), renamed_from=None, replay_id="r1")
    if model is RoutedEvent:
        fields.update(service_id=7, mapping_id=9)
    else:
        fields.update(reason=Reason.UNMAPPED, service_id=None, mapping_id=None)
    encoded = encode_event(model, fields)
    expected = model(**fields)
    assert json.loads(encoded) == json.loads(expected.model_dump_json())
    assert model.model_validate_json(encoded) == expected


def test_encoded_event_keeps_a_non_utc_offset_and_writes_utc_as_z() -> None:
    parsed = ParsedWebhook(
        resource="issue", action="created", occurred_at=datetime.fromisoformat("2026-11-30T23:59:59-14:00")
    )
    fields: dict[str, Any] = event_fields(
        parsed, delivery="d", org="acme", project_slug=None, project_id=None,
        received_at=datetime(2026, 12, 1, tzinfo=UTC), raw=RawRef(topic="t", partition=0, offset=0),
    )  # fmt: skip
    fields.update(reason=Reason.NO_PROJECT)
    decoded = json.loads(encode_event(IgnoredEvent, fields))
    assert decoded["occurred_at"] == "2026-11-30T23:59:59-14:00"
    assert decoded["received_at"] == "2026-12-01T00:00:00Z"
    assert decoded == json.loads(IgnoredEvent(**fields).model_dump_json())
