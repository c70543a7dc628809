"""PostgreSQL unreachable: the admin API answers 503 JSON with Retry-After, and recovers on its own.

A Postgres of this test's own (``scripts/postgres.sh`` under ``tmp_path``) is stopped and started
again while one admin app keeps running; the app reaches it through the TCP forwarder of
``tests/support/outage.py`` (a restarted Postgres may listen on another port). A second
test points the app at a listener that accepts and never answers: the connect timeout makes that a
503 too, not a hung request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

import admin.app
from admin.api import RETRY_AFTER_SECONDS
from admin.app import create_app
from shared.db.migrate import upgrade
from shared.orgs import create_org
from shared.settings import Settings
from tests.admin.conftest import error
from tests.support.outage import Forwarder, database, postgres, with_port

pytestmark = pytest.mark.integration


def unavailable(response: httpx.Response) -> None:
    assert error(response, 503)["code"] == "unavailable"
    assert response.headers["retry-after"] == str(RETRY_AFTER_SECONDS)


async def client_of(app: Starlette, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://admin", headers={"Authorization": f"Bearer {token}"}
    )


async def test_postgres_stopped_answers_503_and_the_app_recovers_without_restart(
    migrated: Settings, tmp_path: Path
) -> None:
    run_dir = tmp_path / "pg"
    started = await asyncio.to_thread(postgres, "start", run_dir)
    direct = started["BLAMETRAIL_DATABASE_URL"]
    upstream: dict[str, int | None] = {"port": int(started["PGPORT"])}  # None while stopped
    forwarder = Forwarder(lambda: upstream["port"])
    try:
        await asyncio.to_thread(upgrade, Settings(database_url=direct))
        async with database(direct) as sessions, sessions() as session, session.begin():
            token = (await create_org(session, "outage")).api_token
        app = create_app(migrated.model_copy(update={"database_url": with_port(direct, await forwarder.start())}))
        async with await client_of(app, token) as client:
            created = await client.post("/api/v1/services", json={"name": "Web App"})
            assert created.status_code == 201, created.text

            await asyncio.to_thread(postgres, "stop", run_dir)
            upstream["port"] = None
            unavailable(await client.get("/api/v1/services"))
            unavailable(await client.post("/api/v1/services", json={"name": "Other"}))
            unavailable(await client.get("/api/v1/incidents?limit=5"))
            # Authentication needs the database, so bad input answers 503 too (never 500).
            error(await client.get("/api/v1/incidents?limit=0"), 503)

            upstream["port"] = int((await asyncio.to_thread(postgres, "start", run_dir))["PGPORT"])
            # The very next call is served: the pool drops the dead connections (pre-ping) and reconnects.
            listed = await client.get("/api/v1/services")
            assert listed.status_code == 200, listed.text
            assert [s["name"] for s in listed.json()] == ["Web App"]
            again = await client.post("/api/v1/services", json={"name": "Other"})
            assert again.status_code == 201, again.text
        await app.state.engine.dispose()
    finally:
        await forwarder.close()
        await asyncio.to_thread(postgres, "stop", run_dir)


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port that accepts connections and never says a word (a database host that hangs)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_a_hanging_database_answers_503_after_the_connect_timeout(
    migrated: Settings, silent_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin.app, "DB_CONNECT_TIMEOUT", 2)
    app = create_app(migrated.model_copy(update={"database_url": with_port(migrated.database_url, silent_port)}))
    async with await client_of(app, "any-token") as client:
        started = time.monotonic()
        unavailable(await asyncio.wait_for(client.get("/api/v1/services"), 30))
        assert time.monotonic() - started < 15
    await app.state.engine.dispose()
