"""Ingest with several workers serves one consistent set of metrics, whichever worker answers."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.settings import Settings
from tests.support import free_port, settings_env, signed_headers
from tests.support.ingest import new_org, start_ingest
from tests.support.metrics import scrape_all
from tests.support.sentry import issue_body

pytestmark = pytest.mark.integration


async def test_two_workers_report_one_set_of_metrics(
    topics: Settings, sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    port = free_port()
    settings = topics.model_copy(
        update={"ingest_port": port, "ingest_workers": 2, "spool_dir": str(tmp_path / "spool")}
    )
    org = await new_org(sessions, f"workers-{os.urandom(4).hex()}")
    sent = 40
    async with httpx.AsyncClient(timeout=5.0, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        process = await start_ingest(settings_env(settings), tmp_path, port, client)
        try:
            answered_by = set()
            for n in range(sent):
                body = issue_body(f"9600{n:03d}", project="web")
                response = await client.post(
                    f"http://127.0.0.1:{port}/webhooks/sentry/{org.org}",
                    content=body,
                    headers=signed_headers(org.client_secret, body, "issue"),
                )
                assert response.status_code == 200, response.text
            totals = []
            for _ in range(12):  # new connections: the kernel spreads them over both workers
                samples = await scrape_all(port, client)
                totals.append(
                    samples.get(
                        ("blametrail_ingest_requests_total", (("outcome", "accepted"), ("resource", "issue"))), 0.0
                    )
                )
                answered_by.add(samples.get(("blametrail_ingest_request_seconds_count", ()), 0.0))
        finally:
            process.stop()
    assert totals == [sent] * len(totals), totals
    assert answered_by == {sent}
    workers = {
        line.split("[")[1].split("]")[0] for line in process.output().splitlines() if "Started server process" in line
    }
    assert len(workers) == 2, process.output()[-2000:]
