"""A database that hangs never holds a webhook past Sentry's 1 s budget.

Ingest runs as a process and reaches PostgreSQL through the forwarder of ``tests/support/outage.py``,
which then makes the database hang (connections accepted, never answered: a host gone silent, the
case a connect timeout exists for). An org whose credentials are cached keeps being served, also
after its entry's TTL ran out; an org never seen gets 503 ``unavailable`` within the budget; once
the database answers again, ingest serves both without a restart.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.orgs import NewOrg
from shared.settings import Settings
from tests.support import free_port, settings_env, signed_headers, wait_until
from tests.support.ingest import new_org, start_ingest
from tests.support.outage import Forwarder, with_port
from tests.support.sentry import issue_body

pytestmark = pytest.mark.integration

BUDGET = 1.0  # Sentry's answer budget
TTL = 0.5  # short: the cached entry runs out while the database hangs
HANG_SECONDS = 4.0  # several TTLs and stale-retry intervals


@pytest.fixture
async def forwarder(migrated: Settings) -> AsyncIterator[Forwarder]:
    port = int(migrated.database_url.rsplit(":", 1)[1].split("/", 1)[0])
    forwarder = Forwarder(lambda: port)
    await forwarder.start()
    yield forwarder
    await forwarder.close()


async def test_a_hanging_database_answers_from_the_cache_or_503_within_the_budget(
    topics: Settings,
    sessions: async_sessionmaker[AsyncSession],
    forwarder: Forwarder,
    tmp_path: Path,
) -> None:
    port = free_port()
    settings = topics.model_copy(
        update={
            "database_url": with_port(topics.database_url, forwarder.port),
            "ingest_port": port,
            "secret_cache_ttl_seconds": TTL,
            "spool_dir": str(tmp_path / "spool"),
        }
    )
    cached = await new_org(sessions, f"cached-{os.urandom(4).hex()}")
    never_seen = await new_org(sessions, f"unseen-{os.urandom(4).hex()}")
    async with httpx.AsyncClient(timeout=10.0) as client:

        async def post(org: NewOrg, n: int) -> tuple[int, float]:
            body = issue_body("5300001", project="frontend", count=n)
            started = time.monotonic()
            response = await client.post(
                f"http://127.0.0.1:{port}/webhooks/sentry/{org.org}",
                content=body,
                headers=signed_headers(org.client_secret, body, "issue"),
            )
            return response.status_code, time.monotonic() - started

        ingest = await start_ingest(settings_env(settings), tmp_path, port, client)
        try:
            assert (await post(cached, 0))[0] == 200

            await forwarder.hang()
            answers: list[tuple[int, float]] = []
            hung_at = time.monotonic()
            while time.monotonic() - hung_at < HANG_SECONDS:
                answers.append(await post(cached, len(answers) + 1))
            assert {status for status, _ in answers} == {200}
            slowest = max(seconds for _, seconds in answers)
            assert slowest < BUDGET, f"a cached org's webhook took {slowest:.3f}s while the database hung"
            status, seconds = await post(never_seen, 0)
            assert (status, seconds < BUDGET) == (503, True), (status, seconds)

            await forwarder.restore()

            async def served() -> bool:
                return (await post(never_seen, 1))[0] == 200

            await wait_until(served, within=30, what="the org never seen to be served once the database answers")
            print(f"{len(answers)} webhooks of a cached org while the database hung, slowest {slowest:.3f}s")
        finally:
            code = ingest.stop()
            print(f"----- ingest (exit {code})\n{ingest.output()[-4000:]}")
    assert code in (0, -15), f"ingest did not shut down cleanly: {code}"
