"""The replay stories of docs/replay.md through ingest, router and writer as processes and the real
``blametrail replay`` command."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.models import AuditRecord, Incident, Organization, Service
from shared.events import RawRef, RoutedEvent
from shared.kafka import make_producer
from shared.topics import Topics
from tests.support import blametrail_command, settings_env, wait_until
from tests.support.metrics import scrape
from tests.support.sentry import issue_body
from tests.support.stack import Stack, audit_for, cli, incidents_for, post, service_name

pytestmark = pytest.mark.integration


def replay(stack: Stack, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [*blametrail_command(), "replay", *args, "--org", stack.org, "--json"],
        env=settings_env(stack.settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def since(moment: datetime) -> str:
    return (moment - timedelta(seconds=1)).isoformat()


async def incident_counts(sessions: async_sessionmaker[AsyncSession], org: str) -> dict[str, int]:
    async with sessions() as session:
        rows = await session.execute(
            select(Service.name, func.count(Incident.id))
            .join(Incident, Incident.service_id == Service.id)
            .join(Organization, Organization.id == Service.org_id)
            .where(Organization.slug == org)
            .group_by(Service.name)
        )
        return {name: count for name, count in rows}


async def test_map_a_forgotten_project_then_replay_its_webhooks(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    env = settings_env(stack.settings)
    started = datetime.now(UTC)
    issues = [f"86{n:05d}" for n in range(5)]
    for issue in issues:
        assert (await post(stack, issue_body(issue, project="payments-worker"))).status_code == 200

    async def ignored() -> bool:
        records = await audit_for(sessions, stack.org, "payments-worker")
        return len(records) == len(issues) and {r.reason for r in records} == {"unmapped"}

    await wait_until(ignored, within=60, what="the forgotten project's webhooks audited as unmapped")
    received = {r.sentry_issue_id: r.received_at for r in await audit_for(sessions, stack.org, "payments-worker")}

    cli(env, "mapping", "add", "--org", stack.org, "payments-worker", "--service", "Payments API")
    before = await incident_counts(sessions, stack.org)

    # What would the replay change? Exactly what it then does.
    dry = replay(stack, "--topic", "raw", "--from", since(started), "--project", "payments-worker", "--dry-run")
    assert (dry["dry_run"], dry["selected"], dry["republished"]) == (True, len(issues), 0)
    [row] = [d for d in dry["diff"] if d["project"] == "payments-worker"]
    assert (row["would_route"], row["stays"], row["will_not_move"]) == ({"Payments API": len(issues)}, 0, 0)

    done = replay(stack, "--topic", "raw", "--from", since(started), "--project", "payments-worker")
    assert done["republished"] == len(issues)

    async def routed() -> bool:
        records = await audit_for(sessions, stack.org, "payments-worker")
        return all(r.outcome == "routed" for r in records)

    await wait_until(routed, within=60, what="the replayed deliveries routed")
    for record in await audit_for(sessions, stack.org, "payments-worker"):
        assert (record.previous_outcome, record.previous_reason) == ("ignored", "unmapped")
        assert record.replay_id == done["replay_id"]
    for issue in issues:
        [incident] = await incidents_for(sessions, stack.org, issue)
        assert await service_name(sessions, incident.service_id) == "Payments API"
        assert incident.event_count == 1
        assert incident.first_seen_at == received[issue]  # the original webhook's time, not the replay's
    after = await incident_counts(sessions, stack.org)
    assert after.get("Payments API", 0) - before.get("Payments API", 0) == len(issues)

    # A second identical replay changes nothing; nor does one after the mapping moved elsewhere.
    replay(stack, "--topic", "raw", "--from", since(started), "--project", "payments-worker")
    cli(env, "mapping", "edit", "--org", stack.org, "payments-worker", "--service", "Email Worker")
    moved = replay(stack, "--topic", "raw", "--from", since(started), "--project", "payments-worker", "--dry-run")
    [row] = [d for d in moved["diff"] if d["project"] == "payments-worker"]
    assert (row["would_route"], row["will_not_move"]) == ({}, len(issues))
    port = stack.settings.writer_metrics_port
    seen_before = await scrape(port, "blametrail_replay_records_total", topic="routed")
    last = replay(stack, "--topic", "raw", "--from", since(started), "--project", "payments-worker")

    async def reached_the_writer() -> bool:
        seen = await scrape(port, "blametrail_replay_records_total", topic="routed")
        return seen >= seen_before + len(issues)

    await wait_until(reached_the_writer, within=60, what="the last replay's records at the writer")
    async with sessions() as session:
        changed = await session.scalar(
            select(func.count()).where(AuditRecord.org_slug == stack.org, AuditRecord.replay_id == last["replay_id"])
        )
    assert changed == 0  # a routed delivery is never changed by a replay
    assert await incident_counts(sessions, stack.org) == after
    for issue in issues:
        [incident] = await incidents_for(sessions, stack.org, issue)
        assert (await service_name(sessions, incident.service_id), incident.event_count) == ("Payments API", 1)


async def test_live_webhooks_during_a_replay_are_all_processed(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    started = datetime.now(UTC)
    for n in range(6):
        assert (await post(stack, issue_body(f"87{n:05d}", project="internal-tools"))).status_code == 200
    await wait_until(
        lambda: _count(sessions, stack.org, "internal-tools", 6), within=60, what="the disabled project's webhooks"
    )
    replaying = asyncio.create_task(
        asyncio.to_thread(replay, stack, "--topic", "raw", "--from", since(started), "--rate", "3")
    )
    live = [f"88{n:05d}" for n in range(10)]
    for issue in live:
        assert (await post(stack, issue_body(issue, project="frontend"))).status_code == 200
    summary = await replaying
    assert summary["republished"] >= 6 and summary["elapsed_seconds"] >= 1.5  # throttled

    async def all_live() -> bool:
        return all([await incidents_for(sessions, stack.org, issue) for issue in live])

    await wait_until(all_live, within=60, what="every live webhook's incident")


async def _count(sessions: async_sessionmaker[AsyncSession], org: str, project: str, n: int) -> bool:
    return len(await audit_for(sessions, org, project)) >= n


async def test_dead_letters_go_back_where_they_came_from_after_the_fix(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """A service deleted by mistake: events for it are dead-lettered (audited failed); once it is
    restored, the DLQ replay sends them back to the routed topic and they take effect once."""
    started = datetime.now(UTC)
    async with sessions() as session:
        org_id = await session.scalar(select(Organization.id).where(Organization.slug == stack.org))
        restored_id = (await session.scalar(select(func.max(Service.id))) or 0) + 100_000
    assert org_id is not None
    delivery = uuid.uuid4().hex * 2
    event = RoutedEvent(
        delivery_id=delivery,
        org=stack.org,
        resource="issue",
        action="created",
        project_slug="restored-project",
        sentry_issue_id="8900001",
        incident_key="issue:8900001",
        title="Payment failed",
        received_at=started,
        raw=RawRef(topic=Topics.from_settings(stack.settings).raw, partition=0, offset=0),
        service_id=restored_id,
        mapping_id=1,
    )
    producer = make_producer(stack.settings, client_id="replay-test")
    await producer.start()
    try:
        await producer.send_and_wait(
            Topics.from_settings(stack.settings).routed,
            value=event.model_dump_json().encode(),
            key=b"k",
            headers=[("org", stack.org.encode()), ("delivery_id", delivery.encode())],
        )
    finally:
        await producer.stop()

    async def failed() -> AuditRecord | None:
        async with sessions() as session:
            return await session.scalar(select(AuditRecord).where(AuditRecord.delivery_id == delivery))

    record = await wait_until(failed, within=60, what="the dead letter audited")
    assert (record.outcome, record.reason) == ("failed", "rejected") and record.dlq_offset is not None

    async with sessions() as session, session.begin():  # the fix: the service is back
        session.add(Service(id=restored_id, org_id=org_id, name=f"Restored {restored_id}"))
    summary = replay(stack, "--topic", "dlq", "--from", since(started))
    assert summary["republished"] >= 1

    async def upgraded() -> AuditRecord | None:
        found = await failed()
        return found if found is not None and found.outcome == "routed" else None

    record = await wait_until(upgraded, within=60, what="the replayed dead letter applied")
    assert (record.previous_outcome, record.previous_reason, record.replay_id) == (
        "failed",
        "rejected",
        summary["replay_id"],
    )
    [incident] = await incidents_for(sessions, stack.org, "8900001")
    assert incident.service_id == restored_id
