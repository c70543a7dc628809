"""Routing decisions, without Kafka or Postgres: the product page's rules."""

from __future__ import annotations

from router.routing import MappingEntry, OrgMappings, route
from shared.events import Reason
from shared.sentry import ParsedWebhook, ProjectRef

MAPPINGS = OrgMappings.of(
    [
        MappingEntry(1, 10, True, "frontend"),
        MappingEntry(2, 20, True, "payments-api", project_id="4505877312345088"),
        MappingEntry(3, 30, True, "email-worker"),
        MappingEntry(4, 40, False, "internal-tools"),
        MappingEntry(5, 50, True, "api-auth"),
        MappingEntry(6, 50, True, "api-core"),
        # Renamed in Sentry from "checkout" to "checkout-web" (learned from an id-carrying delivery).
        MappingEntry(7, 70, True, "checkout", project_id="4505877312345099", renamed_to="checkout-web"),
        # A renamed project whose new slug another mapping owns: the owner keeps its slug.
        MappingEntry(8, 80, True, "legacy", project_id="111", renamed_to="frontend"),
    ]
)


def issue(*slugs: str, resource: str = "issue") -> ParsedWebhook:
    return ParsedWebhook(resource=resource, action="created", projects=tuple(ProjectRef(s) for s in slugs))


def test_active_mapping_routes_to_its_service() -> None:
    [d] = route(issue("payments-api"), MAPPINGS)
    assert d.routed and d.mapping == MAPPINGS.get("payments-api") and d.reason is None


def test_inactive_mapping_is_ignored_but_keeps_its_configuration() -> None:
    [d] = route(issue("internal-tools"), MAPPINGS)
    assert not d.routed and d.reason is Reason.MAPPING_INACTIVE and d.mapping == MAPPINGS.get("internal-tools")


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


def test_the_project_id_finds_a_renamed_project_and_records_the_rename() -> None:
    renamed = ParsedWebhook(
        resource="issue", action="created", projects=(ProjectRef("payments-v2", "4505877312345088"),)
    )
    [d] = route(renamed, MAPPINGS)
    assert d.routed and d.mapping == MAPPINGS.get("payments-api") and d.renamed_from == "payments-api"
    [same] = route(issue("payments-api"), MAPPINGS)
    assert same.routed and same.renamed_from is None


def test_the_id_wins_over_the_slug() -> None:
    """A delivery's id names its project even when its slug is another mapping's (slugs get reused)."""
    parsed = ParsedWebhook(resource="error", action="created", projects=(ProjectRef("frontend", "4505877312345099"),))
    [d] = route(parsed, MAPPINGS)
    assert d.mapping == MAPPINGS.by_id["4505877312345099"] and d.renamed_from == "checkout"


def test_slug_only_deliveries_of_a_renamed_project_follow_the_learned_slug() -> None:
    alert = ParsedWebhook(
        resource="metric_alert", action="critical", projects=(ProjectRef("checkout-web"),), alert_identifier="1"
    )
    [d] = route(alert, MAPPINGS)
    assert d.routed and d.mapping is not None and d.mapping.id == 7 and d.renamed_from == "checkout"
    [owner] = route(issue("frontend"), MAPPINGS)
    assert owner.mapping is not None and owner.mapping.id == 1 and owner.renamed_from is None


def test_an_unknown_id_falls_back_to_the_slug() -> None:
    parsed = ParsedWebhook(resource="issue", action="created", projects=(ProjectRef("email-worker", "999"),))
    [d] = route(parsed, MAPPINGS)
    assert d.routed and d.mapping == MAPPINGS.get("email-worker") and d.renamed_from is None
