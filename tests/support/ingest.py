"""Helpers for the ingest tests: an org, ingest as a process."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.orgs import NewOrg, create_org
from tests.support import ServiceProcess, wait_until


async def new_org(sessions: async_sessionmaker[AsyncSession], slug: str) -> NewOrg:
    async with sessions() as session, session.begin():
        return await create_org(session, slug)


async def start_ingest(env: Mapping[str, str], log_dir: Path, port: int, client: httpx.AsyncClient) -> ServiceProcess:
    """``blametrail ingest`` as a process, once its /readyz answers 200."""
    process = ServiceProcess("ingest", env, log_dir)

    async def ready() -> bool:
        assert process.alive(), f"ingest exited:\n{process.output()}"
        try:
            return (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    try:
        await wait_until(ready, within=30, what="ingest /readyz")
    except BaseException:
        process.stop()
        print(process.output()[-4000:])
        raise
    return process
