"""Routing decisions, without Kafka or Postgres: the product page's rules."""

from __future__ import annotations

from router.routing import MappingEntry, route
from shared.events import Reason
from shared.sentry import ParsedWebhook, ProjectRef

MAPPINGS = {
    "frontend": MappingEntry(1, 10, True),
    "payments-api": MappingEntry(2, 20, True),
    "email-worker": MappingEntry(3, 30, True),
    "internal-tools": MappingEntry(4, 40, False),
    "api-auth": MappingEntry(5, 50, True),
    "api-core": MappingEntry(6, 50, True),
}


def issue(*slugs: str, resource: str = "issue") -> ParsedWebhook:
    return ParsedWebhook(resource=resource, action="created", projects=tuple(ProjectRef(s) for s in slugs))


def test_active_mapping_routes_to_its_service() -> None:
    [d] = route(issue("payments-api"), MAPPINGS)
    assert d.routed and d.mapping == MAPPINGS["payments-api"] and d.reason is None


def test_inactive_mapping_is_ignored_but_keeps_its_configuration() -> None:
    [d] = route(issue("internal-tools"), MAPPINGS)
    assert not d.routed and d.reason is Reason.MAPPING_INACTIVE and d.mapping == MAPPINGS["internal-tools"]


def test_unmapped_project_is_ignored() -> None:
    [d] = route(issue("marketing-site"), MAPPINGS)
    assert d.reason is Reason.UNMAPPED and d.mapping is None and d.project == ProjectRef("marketing-site")


def test_no_project() -> None:
    [d] = route(issue(), MAPPINGS)
    assert d.reason is Reason.NO_PROJECT and d.project is None


def test_unknown_org_wins_over_everything() -> None:
    [d] = route(issue("frontend"), None)
    assert d.reason is Reason.UNKNOWN_ORG


def test_unknown_resource_is_unsupported_even_with_a_mapped_project() -> None:
    [d] = route(issue("frontend", resource="brand_new"), MAPPINGS)
    assert d.reason is Reason.UNSUPPORTED_RESOURCE


def test_metric_alert_yields_one_decision_per_project() -> None:
    parsed = ParsedWebhook(
        resource="metric_alert",
        action="critical",
        projects=(ProjectRef("api-auth"), ProjectRef("api-core"), ProjectRef("internal-tools"), ProjectRef("x")),
        alert_identifier="9",
    )
    decisions = route(parsed, MAPPINGS)
    assert [(d.project.slug if d.project else None, d.reason) for d in decisions] == [
        ("api-auth", None),
        ("api-core", None),
        ("internal-tools", Reason.MAPPING_INACTIVE),
        ("x", Reason.UNMAPPED),
    ]
    # Many projects may share one service: both routed decisions point at service 50.
    assert {d.mapping.service_id for d in decisions[:2] if d.mapping} == {50}
