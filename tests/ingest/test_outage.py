"""Kafka goes away mid-traffic: ingest keeps answering 200 from its spool, and nothing is lost or reordered.

A Kafka broker of this module's own (scripts/kafka.sh in a run directory under tmp) is stopped and
started again while ingest runs as a process; the raw topic is then read back and compared with what
was sent: every delivery present, each key's deliveries in the order they were sent.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ingest.spool_files import spooled_rows
from shared import events
from shared.kafka import create_topics
from shared.orgs import NewOrg
from shared.settings import Settings
from shared.topics import Topics
from tests.support import free_port, settings_env, signed_headers, wait_until
from tests.support.ingest import new_org, start_ingest
from tests.support.kafka import Record, TopicReader
from tests.support.metrics import scrape
from tests.support.outage import Broker
from tests.support.sentry import issue_body

pytestmark = pytest.mark.integration

ANSWER_BUDGET = 1.0  # Sentry's timeout
OUTAGE_SECONDS = 12.0


@dataclass
class Stack:
    settings: Settings
    broker: Broker
    org: NewOrg
    client: httpx.AsyncClient
    log_dir: Path


@pytest.fixture(scope="module")
async def stack(
    migrated: Settings,
    broker: Broker,
    sessions: async_sessionmaker[AsyncSession],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    settings = migrated.model_copy(update={"kafka_bootstrap": broker.bootstrap})
    await create_topics(settings)
    org = await new_org(sessions, f"outage-{os.urandom(4).hex()}")
    async with httpx.AsyncClient(timeout=5.0) as client:
        yield Stack(settings, broker, org, client, tmp_path_factory.mktemp("logs"))


def ingest_env(stack: Stack, port: int, spool_dir: Path) -> dict[str, str]:
    settings = stack.settings.model_copy(update={"ingest_port": port, "spool_dir": str(spool_dir)})
    return settings_env(settings)


@dataclass(frozen=True)
class Sent:
    key: str
    delivery_id: str
    status: str
    seconds: float


async def send(stack: Stack, port: int, issue_id: str, n: int) -> Sent:
    body = issue_body(issue_id, count=n)
    started = time.monotonic()
    response = await stack.client.post(
        f"http://127.0.0.1:{port}/webhooks/sentry/{stack.org.org}",
        content=body,
        headers=signed_headers(stack.org.client_secret, body, "issue"),
    )
    seconds = time.monotonic() - started
    assert response.status_code == 200, response.text
    return Sent(
        f"{stack.org.org}/{issue_id}",
        events.delivery_id(stack.org.org, "issue", body),
        response.json()["status"],
        seconds,
    )


async def traffic(stack: Stack, port: int, issues: list[str], per_issue: int, first: int = 0) -> list[Sent]:
    """Each issue's webhooks one after another, the issues concurrently (as Sentry would)."""

    async def one_issue(issue_id: str) -> list[Sent]:
        return [await send(stack, port, issue_id, first + n) for n in range(per_issue)]

    results = await asyncio.gather(*(one_issue(i) for i in issues))
    return [s for per in results for s in per]


async def read_back(stack: Stack, sent: list[Sent], within: float = 60.0) -> list[Record]:
    """Every record of the raw topic, once all ``sent`` deliveries arrived."""
    raw = TopicReader(stack.broker.bootstrap, [Topics.from_settings(stack.settings).raw])
    await raw.start()
    try:
        await raw.wait_for({s.delivery_id for s in sent}, within=within)
        return list(raw.records)
    finally:
        await raw.stop()


def assert_complete_and_in_order(sent: list[Sent], records: list[Record]) -> None:
    """All deliveries present; per key, first occurrences in send order, all on one partition."""
    first: dict[str, Record] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        first.setdefault(r.delivery_id, r)
    assert {s.delivery_id for s in sent} <= set(first)
    for key in {s.key for s in sent}:
        mine = [s.delivery_id for s in sent if s.key == key]
        partitions = {first[d].partition for d in mine}
        assert len(partitions) == 1, f"{key} spread over partitions {partitions}"
        arrived = sorted(mine, key=lambda d: first[d].offset)
        assert arrived == mine, f"{key}: deliveries reached Kafka out of order"


async def spool_depth(stack: Stack, port: int) -> float:
    return await scrape(port, client=stack.client, name="blametrail_ingest_spool_depth")


async def test_broker_outage_answers_from_the_spool_and_delivers_everything_in_order(
    stack: Stack, tmp_path: Path
) -> None:
    port = free_port()
    ingest = await start_ingest(ingest_env(stack, port, tmp_path / "spool"), stack.log_dir, port, stack.client)
    try:
        before = await traffic(stack, port, ["7001", "7002"], 3)
        assert {s.status for s in before} == {"accepted"}

        stack.broker.stop()
        issues = [f"71{n:02d}" for n in range(6)]
        # Longer than the producer's request timeout (10 s): its queued batches expire, which is
        # what wedges aiokafka's idempotent producer after the broker returns (aiokafka issue 1017).
        during: list[Sent] = []
        outage_started = time.monotonic()
        while time.monotonic() - outage_started < OUTAGE_SECONDS:
            during += await traffic(stack, port, issues, 1, first=100 + len(during))
            await asyncio.sleep(0.1)  # Sentry's pace, not a wait for anything
        slowest = max(s.seconds for s in during)
        assert slowest < ANSWER_BUDGET, f"slowest answer during the outage took {slowest:.3f}s"
        assert {s.status for s in during} == {"spooled"}
        assert await spool_depth(stack, port) == len(during)
        ready = await stack.client.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 200 and "spool writable" in ready.text

        await stack.broker.start_again()
        records = await read_back(stack, before + during)
        assert_complete_and_in_order(before + during, records)

        async def spool_empty() -> bool:
            return await spool_depth(stack, port) == 0

        await wait_until(spool_empty, within=30, what="the spool to drain")
        drained = await scrape(port, client=stack.client, name="blametrail_ingest_spool_drained_total")
        assert drained >= len(during)
        spooled = await scrape(
            port, client=stack.client, name="blametrail_ingest_requests_total", outcome="spooled", resource="issue"
        )
        assert spooled == len(during)

        after = await traffic(stack, port, issues[:2], 2, first=200)
        assert {s.status for s in after} == {"accepted"}  # straight to Kafka again
        records = await read_back(stack, before + during + after)
        assert_complete_and_in_order(before + during + after, records)
        restarts = await scrape(port, client=stack.client, name="blametrail_ingest_producer_restarts_total")
        duplicates = len(records) - len({r.delivery_id for r in records})
        print(f"outage: slowest answer {slowest:.3f}s, producer restarts {restarts}, duplicates {duplicates}")
    finally:
        code = ingest.stop()
        print(f"----- ingest (exit {code})\n{ingest.output()[-6000:]}")
    assert code in (0, -15), f"ingest did not shut down cleanly: {code}"


async def test_a_restarted_ingest_drains_the_spool_it_left_behind(stack: Stack, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    port = free_port()
    first = await start_ingest(ingest_env(stack, port, spool_dir), stack.log_dir, port, stack.client)
    stack.broker.stop()
    try:
        left = await traffic(stack, port, ["7201", "7202"], 5)
        assert {s.status for s in left} == {"spooled"}
    finally:
        started = time.monotonic()
        code = first.stop()
        stopped_in = time.monotonic() - started
        print(f"----- first ingest (exit {code}, {stopped_in:.1f}s)\n{first.output()[-4000:]}")
    assert code in (0, -15), f"ingest did not shut down cleanly without Kafka: {code}"
    assert stopped_in < 15
    assert spooled_rows(spool_dir) == len(left)  # still on disk for the next process

    port = free_port()
    second = await start_ingest(ingest_env(stack, port, spool_dir), stack.log_dir, port, stack.client)
    try:
        assert await spool_depth(stack, port) == len(left)  # found, and counted, at start
        more = await traffic(stack, port, ["7201", "7203"], 3, first=50)
        assert {s.status for s in more} == {"spooled"}  # leftovers go first: nothing overtakes them

        await stack.broker.start_again()
        records = await read_back(stack, left + more)
        assert_complete_and_in_order(left + more, records)

        async def spool_empty() -> bool:
            return await spool_depth(stack, port) == 0

        await wait_until(spool_empty, within=30, what="the spool to drain")
    finally:
        code = second.stop()
        print(f"----- second ingest (exit {code})\n{second.output()[-4000:]}")
    assert code in (0, -15)
    assert spooled_rows(spool_dir) == 0
