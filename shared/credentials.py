"""What ingest reads to verify a webhook — an org's client secrets, its legacy plugin token hash — on
plain psycopg: ingest does not load SQLAlchemy (18 MB of its memory, 0.4 s of its start) for two queries.

:class:`Connections` lends at most ``size`` autocommit connections, opened when needed. A reused
connection that fails with ``OperationalError`` (the database restarted since it was last used) is
dropped and the query runs once more on a new one, as a pool's pre-ping would; any other failure,
or a cancellation, drops the connection it happened on.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg

from shared.db.conninfo import DB_CONNECT_TIMEOUT
from shared.secrets import KeyRing, decrypt_secret

ORG_SECRETS = (
    "SELECT i.client_secret, i.previous_client_secret FROM sentry_integrations AS i"
    " JOIN organizations AS o ON o.id = i.org_id WHERE o.slug = %s"
)
LEGACY_TOKEN = (
    "SELECT i.legacy_plugin_token FROM sentry_integrations AS i"
    " JOIN organizations AS o ON o.id = i.org_id WHERE o.slug = %s"
)


class Connections:
    """Up to ``size`` connections to ``url`` (libpq form); ``fetchone`` runs one query."""

    def __init__(self, url: str, size: int = 2, connect_timeout: int = DB_CONNECT_TIMEOUT) -> None:
        self._url = url
        self._connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(size)
        self._idle: list[psycopg.AsyncConnection[Any]] = []

    async def fetchone(self, query: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        async with self._slots:
            if self._idle:
                with contextlib.suppress(psycopg.OperationalError):  # it died while idle: a new one
                    return await self._fetchone(self._idle.pop(), query, params)
            conn = await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, connect_timeout=self._connect_timeout
            )
            return await self._fetchone(conn, query, params)

    async def _fetchone(
        self, conn: psycopg.AsyncConnection[Any], query: str, params: tuple[Any, ...]
    ) -> tuple[Any, ...] | None:
        """The query's row on ``conn``; ``conn`` goes back to the idle ones, or is dropped if it failed."""
        try:
            row: tuple[Any, ...] | None = await (await conn.execute(query, params)).fetchone()
        except BaseException:
            await _drop(conn)
            raise
        self._idle.append(conn)
        return row

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await _drop(conn)


async def _drop(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


async def org_secrets(connections: Connections, slug: str, keys: KeyRing | None = None) -> tuple[str, ...] | None:
    """The secrets a webhook of ``slug`` may be signed with (decrypted), or None for an unknown org."""
    row = await connections.fetchone(ORG_SECRETS, (slug,))
    if row is None:
        return None
    return tuple(decrypt_secret(s, keys) for s in row if s)


async def legacy_token_hash(connections: Connections, slug: str) -> str | None:
    """Hex SHA-256 of the org's legacy plugin token, or None when the org is unknown or has it off."""
    row = await connections.fetchone(LEGACY_TOKEN, (slug,))
    return row[0] if row is not None else None
