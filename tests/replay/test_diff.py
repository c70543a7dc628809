"""The dry-run routing diff of a raw replay, on a hand-made audit table and today's mappings."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import events
from shared.db.models import AuditRecord
from shared.events import rfc3339
from shared.mappings import add_mapping
from shared.settings import Settings
from shared.topics import Topics
from tests.replay.support import at, cli, end_total, org_with_services, own_settings, produce, raw, replay
from tests.support.sentry import issue_body

pytestmark = pytest.mark.integration

# Sentry project → (today's mapping: service, active) or None, and its deliveries' audit record
# then: ("ignored" or "failed", None) / ("routed", service) / None (the writer never saw it).
CASES: dict[str, tuple[tuple[str, bool] | None, tuple[str, str | None] | None]] = {
    "newly-mapped": (("Web App", True), ("ignored", None)),
    "same": (("Payments API", True), ("routed", "Payments API")),
    "moved": (("Email Worker", True), ("routed", "Payments API")),
    "disabled": (("Web App", False), ("routed", "Web App")),
    "still-unmapped": (None, ("ignored", None)),
    "fresh": (("Web App", True), None),
    "was-failed": (("Payments API", True), ("failed", None)),
}


async def test_the_diff_counts_what_would_route_stay_and_not_move(
    topics: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    settings = await own_settings(topics, "diff")
    t = Topics.from_settings(settings)
    slug, org_id, services = await org_with_services(sessions, "Web App", "Payments API", "Email Worker")
    async with sessions() as session, session.begin():
        for project, (mapping, _) in CASES.items():
            if mapping is not None:
                await add_mapping(session, org_id, project, services[mapping[0]], active=mapping[1])

    records = []
    for project, (_, then) in CASES.items():
        # Two deliveries a project (the second delivered twice: it counts once).
        for issue in ("1", "2"):
            record = raw(t, slug, issue_body(f"{project}-{issue}", project=project), minute=1)
            records += [record, record] if issue == "2" else [record]
            if then is not None:
                async with sessions() as session, session.begin():
                    session.add(audit(org_id, slug, events.delivery_id(slug, "issue", record.value), project,
                                      then[0], services[then[1]] if then[1] else None))  # fmt: skip
    await produce(settings, records)
    before = await end_total(settings, t.all())

    summary = await replay(settings, "raw", 0, 10, org=slug, dry_run=True)

    assert (summary.counts.scanned, summary.counts.selected, summary.counts.republished) == (21, 21, 0)
    assert summary.diff == [
        row(slug, "disabled", will_not_move=2),
        row(slug, "fresh", not_recorded=2),
        row(slug, "moved", will_not_move=2),
        row(slug, "newly-mapped", would_route={"Web App": 2}),
        row(slug, "same", stays=2),
        row(slug, "still-unmapped", stays=2),
        row(slug, "was-failed", would_route={"Payments API": 2}),
    ]
    assert await end_total(settings, t.all()) == before  # a dry run changes nothing

    done = cli(settings, "replay", "--topic", "raw", "--from", rfc3339(at(0)), "--to", rfc3339(at(10)), "--org", slug,
               "--dry-run")  # fmt: skip
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    table = done.stdout.split("routing diff")[1].splitlines()[1:]
    assert table[0].split("  ")[0] == "PROJECT"
    assert [line.split() for line in table[1:]] == [
        [f"{slug}/disabled", "0", "0", "2", "0"],
        [f"{slug}/fresh", "0", "0", "0", "2"],
        [f"{slug}/moved", "0", "0", "2", "0"],
        [f"{slug}/newly-mapped", "2", "→", "Web", "App", "0", "0", "0"],
        [f"{slug}/same", "0", "2", "0", "0"],
        [f"{slug}/still-unmapped", "0", "2", "0", "0"],
        [f"{slug}/was-failed", "2", "→", "Payments", "API", "0", "0", "0"],
    ]


def row(org: str, project: str, would_route: dict[str, int] | None = None, **counts: int) -> dict[str, object]:
    return {
        "org": org,
        "project": project,
        "would_route": would_route or {},
        **{"stays": 0, "will_not_move": 0, "not_recorded": 0, **counts},
    }


def audit(org_id: int, org: str, delivery: str, project: str, outcome: str, service_id: int | None) -> AuditRecord:
    return AuditRecord(
        delivery_id=delivery,
        project_slug=project,
        org_id=org_id,
        org_slug=org,
        resource="issue",
        action="created",
        outcome=outcome,
        reason={"ignored": "unmapped", "failed": "database_rejected"}.get(outcome),
        service_id=service_id,
        received_at=at(1),
        raw_topic="sentry.webhooks.raw",
        raw_partition=0,
        raw_offset=0,
    )
