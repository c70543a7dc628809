"""Ingest's record key: ``raw_record_key`` gives the router parser's ``partition_key``, cheaply.

Every corpus body is keyed under every resource (its own and the others: a wrong header must not
make the two disagree), then bodies of odd shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.sentry import KNOWN_RESOURCES, parse_webhook, partition_key, raw_record_key
from tests.support.sentry import payloads_dir

ORG = "acme"
RESOURCES = [*sorted(KNOWN_RESOURCES), "brand_new_resource", ""]


def corpus() -> list[Path]:
    files = sorted(payloads_dir().rglob("*.json"))
    assert len(files) >= 30
    return files


ODD_BODIES: list[object] = [
    None,
    [],
    [{"data": {"issue": {"id": "1"}}}],
    "a string",
    42,
    True,
    {},
    {"data": None},
    {"data": []},
    {"data": "x", "id": 7, "project": "web"},
    {"data": {"issue": None, "error": 5, "event": [], "metric_alert": "x", "comment": None}},
    {"data": {"issue": {"id": True, "project": {"slug": "Not A Slug"}, "shortId": "WEB-APP-12"}}},
    {"data": {"issue": {"id": 12, "project": {"slug": None}, "shortId": "no-dash-"}}},
    {"data": {"issue": {"id": "x" * 65, "project": [], "shortId": 12}}},
    {"data": {"issue": {"id": "", "shortId": "-12"}}},
    {"data": {"issue": {"project": {"slug": "123"}, "shortId": "PAY-1"}}},
    {"data": {"error": {"issue_id": 5, "url": "https://s.io/api/0/projects/acme/web/events/1/"}}},
    {"data": {"event": {"issue_id": None, "url": "https://s.io/api/0/projects/acme/Bad_Slug!/events/1/"}}},
    {"data": {"event": {"url": 17}}},
    {"data": {"metric_alert": {"projects": [None, 3, "", "web", "api"]}}},
    {"data": {"metric_alert": {"projects": "web", "alert_rule": {"projects": ["api"]}}}},
    {"data": {"metric_alert": {"alert_rule": {"projects": [["x"], {"a": 1}]}}}},
    {"data": {"metric_alert": {"projects": []}}},
    {"data": {"issue_id": 9, "project_slug": "web", "projectSlug": "app", "group_id": "77"}},
    {"data": {"issue_id": False, "project_slug": 1, "projectSlug": [], "group_id": {}}},
    {"id": "55", "project_slug": None, "project": "web"},
    {"id": 0, "project_slug": "Web", "project": 3},
    {"id": [], "project": "api"},
]


@pytest.mark.parametrize("path", corpus(), ids=lambda p: p.name)
def test_every_corpus_body_gets_the_parsers_key_under_every_resource(path: Path) -> None:
    body = json.loads(path.read_bytes())
    for resource in RESOURCES:
        assert raw_record_key(ORG, resource, body) == partition_key(ORG, parse_webhook(resource, body)), resource


@pytest.mark.parametrize("body", ODD_BODIES, ids=lambda b: repr(b)[:40])
def test_odd_shapes_get_the_parsers_key(body: object) -> None:
    for resource in RESOURCES:
        assert raw_record_key(ORG, resource, body) == partition_key(ORG, parse_webhook(resource, body)), resource


def test_the_key_names_the_issue_else_the_project_else_the_org() -> None:
    assert raw_record_key(ORG, "issue", {"data": {"issue": {"id": "42", "project": {"slug": "web"}}}}) == "acme/42"
    assert raw_record_key(ORG, "metric_alert", {"data": {"metric_alert": {"projects": ["web"]}}}) == "acme/web"
    assert raw_record_key(ORG, "installation", {"data": {}}) == "acme"
