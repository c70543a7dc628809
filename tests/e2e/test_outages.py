"""Outages that last, under load: PostgreSQL down 30 s, Kafka down 30 s, the whole pipeline running.

Ingest, router and writer run as processes (``tests.support.stack.running_stack``) on a Kafka broker
of this module's own (``scripts/kafka.sh``, stopped and started again like an operator would, the
mechanism of ``tests/ingest/test_outage.py``) and reach PostgreSQL through the forwarder of
``tests/support/outage.py`` (on a thread of its own), which cuts every service off the session's
database without stopping it. The admin app runs in-process on the same forwarder.

Signed, distinct webhooks (mapped, inactive and unmapped projects) go in at ``RATE`` per second, open
loop (``tests.support.outage.open_loop``: ``bench.openloop`` in a process of its own, latency counted
from each request's due time), ``BEFORE_SECONDS`` before the outage, through it and
``AFTER_SECONDS`` past it. Afterwards: every
answer 200 within Sentry's 1 s budget, every acknowledged delivery exactly one audit record with the
outcome its project calls for, one incident per routed Sentry issue, and each service's log at most
``LOG_LINES_PER_OUTAGE`` warning-or-worse lines over the outage (the repeat filter of
``shared/logs.py``).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from admin.app import create_app
from bench import openloop
from shared import events
from shared.db.models import AuditRecord, Incident, Organization
from shared.security import sign
from shared.settings import Settings
from tests.support import ServiceProcess, wait_until
from tests.support.metrics import scrape
from tests.support.outage import Broker, ThreadedForwarder, open_loop, with_port
from tests.support.sentry import issue_body
from tests.support.stack import Stack, running_stack

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = 30.0
RATE = 200  # webhooks per second
BEFORE_SECONDS = 3.0
AFTER_SECONDS = 3.0
BUDGET = 1.0  # Sentry's answer budget
LOG_LINES_PER_OUTAGE = 60  # per service: one line per kind of failure per 10 s leaves room for a dozen kinds
ISSUES = 40  # Sentry issues per test, spread over the projects below
# (Sentry project, audit outcome, reason): the stack's example mappings, and a project mapped nowhere.
PROJECTS = [
    ("frontend", "routed", None),
    ("payments-api", "routed", None),
    ("internal-tools", "ignored", "mapping_inactive"),
    ("not-mapped-anywhere", "ignored", "unmapped"),
]


@dataclass
class Pipeline:
    stack: Stack
    broker: Broker
    database: ThreadedForwarder
    admin: httpx.AsyncClient

    def process(self, command: str) -> ServiceProcess:
        return next(p for p in self.stack.processes if p.command == command)

    @property
    def ingest_port(self) -> int:
        return self.stack.settings.ingest_port

    async def writer_database_up(self) -> float:
        return await scrape(self.stack.settings.writer_metrics_port, "blametrail_writer_database_up")

    async def ingest_metric(self, name: str, **labels: str) -> float:
        return await scrape(self.ingest_port, name, self.stack.client, **labels)

    async def admin_status(self) -> int:
        return (await self.admin.get("/api/v1/incidents", params={"limit": 5})).status_code


@pytest.fixture(scope="module")
async def pipeline(
    migrated: Settings, broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Pipeline]:
    port = int(migrated.database_url.rsplit(":", 1)[1].split("/", 1)[0])
    forwarder = ThreadedForwarder(lambda: port)  # relays while running_stack runs the CLI
    await forwarder.start()
    settings = migrated.model_copy(
        update={
            "kafka_bootstrap": broker.bootstrap,
            "database_url": with_port(migrated.database_url, forwarder.port),
            "spool_dir": str(tmp_path_factory.mktemp("outage-spool")),
        }
    )
    try:
        async with running_stack(settings, tmp_path_factory.mktemp("outage-services")) as stack:
            app = create_app(stack.settings)
            headers = {"Authorization": f"Bearer {stack.api_token}"}
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://admin", headers=headers) as admin:
                yield Pipeline(stack, broker, forwarder, admin)
            await app.state.engine.dispose()
    finally:
        await forwarder.close()


@dataclass
class Load:
    """The webhooks of one test: their requests, delivery ids, and what each should become."""

    requests: list[bytes]
    expected: dict[str, tuple[str, str, str | None]]  # delivery id → (project, outcome, reason)
    routed_issues: set[str]
    issue_ids: list[str]


def load(pipeline: Pipeline, first_issue: int, seconds: float) -> Load:
    stack = pipeline.stack
    path = f"/webhooks/sentry/{stack.org}"
    requests, expected = [], {}
    issue_ids = [str(first_issue + i) for i in range(ISSUES)]
    for n in range(int(RATE * seconds)):
        issue = n % ISSUES
        project, outcome, reason = PROJECTS[issue % len(PROJECTS)]
        body = issue_body(issue_ids[issue], project=project, count=n + 1)
        requests.append(openloop.request_bytes("127.0.0.1", pipeline.ingest_port, path, sign(stack.secret, body), body))
        expected[events.delivery_id(stack.org, "issue", body)] = (project, outcome, reason)
    routed = {issue_ids[i] for i in range(ISSUES) if PROJECTS[i % len(PROJECTS)][1] == "routed"}
    return Load(requests, expected, routed, issue_ids)


async def send(pipeline: Pipeline, work: Load, seconds: float) -> list[openloop.Answer]:
    """``work`` at ``RATE`` per second over ``seconds``, from a process of its own."""
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return await loop.run_in_executor(pool, open_loop, pipeline.ingest_port, work.requests, RATE, seconds)


def assert_answers(answers: list[openloop.Answer], work: Load) -> float:
    """Every webhook answered 200 within the budget; the slowest answer."""
    statuses = Counter(a.status for a in answers)
    errors = Counter(a.error for a in answers if a.error)
    late = sorted(round(a.latency, 2) for a in answers if a.latency >= BUDGET)
    assert statuses == {200: len(work.requests)}, f"answers by status: {statuses}, errors {errors}, late {late}"
    slowest = max(a.latency for a in answers)
    assert slowest < BUDGET, f"slowest answer took {slowest:.3f}s"
    return slowest


async def audited(sessions: async_sessionmaker[AsyncSession], org: str, work: Load) -> list[AuditRecord]:
    async with sessions() as session:
        rows = await session.scalars(
            select(AuditRecord).where(AuditRecord.org_slug == org, AuditRecord.sentry_issue_id.in_(work.issue_ids))
        )
        return list(rows)


async def assert_exact(sessions: async_sessionmaker[AsyncSession], org: str, work: Load) -> None:
    """Every acknowledged delivery exactly one audit record, as its project calls for; one incident
    per routed Sentry issue and none for the others."""
    records = await audited(sessions, org, work)
    per_delivery = Counter(r.delivery_id for r in records)
    assert set(per_delivery) == set(work.expected)
    assert {d: n for d, n in per_delivery.items() if n != 1} == {}
    wrong = [r for r in records if (r.project_slug, r.outcome, r.reason) != work.expected[r.delivery_id]]
    assert wrong == [], f"{len(wrong)} audit records with another outcome, e.g. {wrong[0].__dict__}"
    async with sessions() as session:
        incidents = (
            await session.execute(
                select(Incident.sentry_issue_id, func.count())
                .join(Organization, Organization.id == Incident.org_id)
                .where(Organization.slug == org, Incident.sentry_issue_id.in_(work.issue_ids))
                .group_by(Incident.sentry_issue_id)
            )
        ).all()
    assert dict(incidents) == dict.fromkeys(work.routed_issues, 1)


async def all_audited(sessions: async_sessionmaker[AsyncSession], org: str, work: Load, within: float) -> float:
    """Seconds until every delivery of ``work`` has its audit record."""
    started = time.monotonic()

    async def complete() -> bool:
        async with sessions() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(AuditRecord)
                .where(AuditRecord.org_slug == org, AuditRecord.sentry_issue_id.in_(work.issue_ids))
            )
        return count == len(work.expected)

    await wait_until(complete, within=within, what=f"{len(work.expected)} audit records")
    return time.monotonic() - started


class LogWindow:
    """Each service's log lines from now until :meth:`failure_lines` (offsets in its log file)."""

    def __init__(self, processes: list[ServiceProcess]) -> None:
        self._start = {p.command: (p, p.log_path.stat().st_size) for p in processes}

    def failure_lines(self) -> dict[str, int]:
        """Per service: lines that are not a JSON record below warning (tracebacks count line by line)."""
        counts = {}
        for command, (process, offset) in self._start.items():
            with process.log_path.open("rb") as log:
                log.seek(offset)
                lines = log.read().decode(errors="replace").splitlines()
            counts[command] = sum(1 for line in lines if line.strip() and not _quiet(line))
        return counts


def _quiet(line: str) -> bool:
    if line.startswith("INFO:"):  # uvicorn's own lines
        return True
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("level") in ("debug", "info")


async def until(moment: float) -> None:
    """The load's schedule, not a wait for anything: the outage starts and ends at fixed times."""
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def during(what: str, probe: Callable[[], Awaitable[bool]]) -> None:
    await wait_until(probe, within=OUTAGE_SECONDS / 2, what=what)


async def test_postgres_down_30s_under_load_acks_within_budget_and_ends_exact(
    pipeline: Pipeline, sessions: async_sessionmaker[AsyncSession]
) -> None:
    seconds = BEFORE_SECONDS + OUTAGE_SECONDS + AFTER_SECONDS
    work = load(pipeline, 6_100_000, seconds)
    started = time.monotonic()
    sending = asyncio.create_task(send(pipeline, work, seconds))

    await until(started + BEFORE_SECONDS)
    logs = LogWindow(pipeline.stack.processes)
    await pipeline.database.cut()
    down_at = time.monotonic()

    async def writer_waits() -> bool:
        return await pipeline.writer_database_up() == 0

    async def admin_unavailable() -> bool:
        return await pipeline.admin_status() == 503

    await during("the writer to wait for the database", writer_waits)
    await during("the admin API to answer 503", admin_unavailable)
    await until(down_at + OUTAGE_SECONDS)
    await pipeline.database.restore()
    up_at = time.monotonic()

    async def admin_serves() -> bool:
        return await pipeline.admin_status() == 200

    await wait_until(admin_serves, within=30, what="the admin API to recover")
    admin_back = time.monotonic() - up_at
    slowest = assert_answers(await sending, work)
    await all_audited(sessions, pipeline.stack.org, work, within=120)
    caught_up = time.monotonic() - up_at
    assert await pipeline.writer_database_up() == 1
    lines = logs.failure_lines()
    await assert_exact(sessions, pipeline.stack.org, work)
    print(
        f"postgres down {OUTAGE_SECONDS:.0f}s at {RATE}/s: {len(work.requests)} webhooks all 200, slowest "
        f"{slowest:.3f}s; admin back {admin_back:.2f}s and writer caught up {caught_up:.1f}s after the "
        f"database; warning-or-worse log lines {lines}"
    )
    assert all(n <= LOG_LINES_PER_OUTAGE for n in lines.values()), lines


async def test_kafka_down_30s_under_load_spools_then_drains_and_ends_exact(
    pipeline: Pipeline, sessions: async_sessionmaker[AsyncSession]
) -> None:
    seconds = BEFORE_SECONDS + OUTAGE_SECONDS + AFTER_SECONDS
    work = load(pipeline, 6_200_000, seconds)
    spooled_before = await pipeline.ingest_metric(
        "blametrail_ingest_requests_total", outcome="spooled", resource="issue"
    )
    drained_before = await pipeline.ingest_metric("blametrail_ingest_spool_drained_total")
    started = time.monotonic()
    sending = asyncio.create_task(send(pipeline, work, seconds))

    await until(started + BEFORE_SECONDS)
    logs = LogWindow(pipeline.stack.processes)
    await asyncio.to_thread(pipeline.broker.stop)
    down_at = time.monotonic()

    async def spooling() -> bool:
        return await pipeline.ingest_metric("blametrail_ingest_spool_depth") > 0

    await during("ingest to spool", spooling)
    await until(down_at + OUTAGE_SECONDS)
    await pipeline.broker.start_again()
    up_at = time.monotonic()
    slowest = assert_answers(await sending, work)
    spooled = (
        await pipeline.ingest_metric("blametrail_ingest_requests_total", outcome="spooled", resource="issue")
        - spooled_before
    )
    assert spooled >= RATE * OUTAGE_SECONDS * 0.9, spooled

    async def drained() -> bool:
        return await pipeline.ingest_metric("blametrail_ingest_spool_depth") == 0

    await wait_until(drained, within=120, what="the spool to drain")
    drain_took = time.monotonic() - up_at
    print(
        f"kafka down {OUTAGE_SECONDS:.0f}s (+{up_at - down_at - OUTAGE_SECONDS:.0f}s to start again) at {RATE}/s: "
        f"{len(work.requests)} webhooks all 200, slowest {slowest:.3f}s, {spooled:.0f} spooled; spool drained "
        f"{drain_took:.1f}s after the broker was back"
    )
    assert await pipeline.ingest_metric("blametrail_ingest_spool_drained_total") - drained_before >= spooled
    await all_audited(sessions, pipeline.stack.org, work, within=120)
    caught_up = time.monotonic() - up_at
    lines = logs.failure_lines()
    await assert_exact(sessions, pipeline.stack.org, work)
    settings = pipeline.stack.settings
    replaced = {
        name: await scrape(port, "blametrail_consumer_producer_restarts_total", group=group)
        for name, port, group in (
            ("router", settings.router_metrics_port, settings.router_group),
            ("writer", settings.writer_metrics_port, settings.writer_group),
        )
    }
    print(
        f"kafka: writer caught up {caught_up:.1f}s after the broker was back; producers replaced {replaced}; "
        f"warning-or-worse log lines {lines}"
    )
    assert all(n <= LOG_LINES_PER_OUTAGE for n in lines.values()), lines
