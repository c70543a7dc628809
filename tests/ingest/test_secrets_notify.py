"""Org and secret changes reach a running ingest by NOTIFY within a second, not at the cache's TTL.

Ingest runs as a process with a credential TTL of five minutes, so only the NOTIFY path (ingest's
LISTEN connection invalidating its caches) can make a change live within ``LIVE_WITHIN``. The
changes are made the operator's way, with the ``blametrail org`` commands.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from shared.settings import Settings
from tests.support import ServiceProcess, blametrail_command, free_port, settings_env, signed_headers, wait_until
from tests.support.ingest import start_ingest
from tests.support.sentry import issue_body

pytestmark = pytest.mark.integration

LIVE_WITHIN = 1.0  # seconds from the command's commit to a change taking effect (issue 16, item 8)
LONG_TTL = 300.0  # far longer than LIVE_WITHIN: the TTL cannot be what makes a change live


@dataclass
class Ingest:
    env: dict[str, str]
    base: str
    client: httpx.AsyncClient
    process: ServiceProcess

    async def post(self, org: str, secret: str, body: bytes) -> int:
        headers = signed_headers(secret, body, "issue")
        return (await self.client.post(f"{self.base}/webhooks/sentry/{org}", content=body, headers=headers)).status_code

    def org(self, *args: str, stdin: str | None = None) -> dict[str, str]:
        """``blametrail org …`` (its JSON answer) against ingest's database."""
        done = subprocess.run(
            [*blametrail_command(), "org", *args], env=self.env, input=stdin, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        answer: dict[str, str] = json.loads(done.stdout)
        return answer

    async def accepted_within(self, org: str, secret: str, body: bytes, since: float) -> float:
        """Seconds from ``since`` until a webhook signed with ``secret`` is accepted (at most LIVE_WITHIN)."""

        async def accepted() -> bool:
            return await self.post(org, secret, body) == 200

        await wait_until(accepted, within=LIVE_WITHIN - (time.monotonic() - since), what=f"{org} to accept")
        return time.monotonic() - since

    async def refused_within(self, org: str, secret: str, body: bytes, since: float) -> float:
        async def refused() -> bool:
            return await self.post(org, secret, body) == 401

        await wait_until(refused, within=LIVE_WITHIN - (time.monotonic() - since), what=f"{org} to refuse")
        return time.monotonic() - since


@pytest.fixture(scope="module")
async def ingest(topics: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Ingest]:
    port = free_port()
    settings = topics.model_copy(
        update={
            "ingest_port": port,
            "public_url": f"http://127.0.0.1:{port}",
            "secret_cache_ttl_seconds": LONG_TTL,
            "spool_dir": str(tmp_path_factory.mktemp("spool")),
        }
    )
    env = settings_env(settings)
    async with httpx.AsyncClient(timeout=5.0) as client:
        process = await start_ingest(env, tmp_path_factory.mktemp("ingest"), port, client)
        try:
            yield Ingest(env, f"http://127.0.0.1:{port}", client, process)
        finally:
            code = process.stop()
            print(f"----- ingest (exit {code})\n{process.output()[-4000:]}")
    assert code in (0, -15), f"ingest did not shut down cleanly: {code}"


async def test_an_org_created_after_its_webhook_was_refused_is_live_within_a_second(ingest: Ingest) -> None:
    slug = f"late-{os.urandom(4).hex()}"
    body = issue_body("5200001", project="frontend")
    assert await ingest.post(slug, "a-secret-nobody-has-yet-0123456789", body) == 401  # "unknown" cached now
    assert await ingest.post(slug, "a-secret-nobody-has-yet-0123456789", body) == 401

    created = await asyncio.to_thread(ingest.org, "create", slug)
    took = await ingest.accepted_within(slug, created["client_secret"], body, time.monotonic())
    print(f"new org accepted {took:.3f}s after org create returned")


async def test_set_secret_and_rotate_secret_are_live_within_a_second(ingest: Ingest) -> None:
    slug = f"rotating-{os.urandom(4).hex()}"
    first = (await asyncio.to_thread(ingest.org, "create", slug))["client_secret"]
    body = issue_body("5200002", project="frontend")
    assert await ingest.post(slug, first, body) == 200  # cached now
    given = "the-client-secret-sentry-shows-" + os.urandom(8).hex()
    assert await ingest.post(slug, given, body) == 401

    await asyncio.to_thread(ingest.org, "set-secret", slug, stdin=given + "\n")
    took = await ingest.accepted_within(slug, given, body, time.monotonic())
    assert await ingest.post(slug, first, body) == 200  # the previous one stays valid until the next change
    print(f"set-secret live after {took:.3f}s")

    rotated = (await asyncio.to_thread(ingest.org, "rotate-secret", slug))["client_secret"]
    done = time.monotonic()
    took = await ingest.accepted_within(slug, rotated, body, done)
    refused = await ingest.refused_within(slug, first, body, done)  # two changes back: no longer valid
    assert await ingest.post(slug, given, body) == 200  # the previous one, as documented
    print(f"rotate-secret live after {took:.3f}s, the secret two changes back refused after {refused:.3f}s")
