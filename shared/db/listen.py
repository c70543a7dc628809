"""LISTEN on a PostgreSQL channel over a connection of its own, reconnecting with backoff.

The router's mapping cache and ingest's credential caches learn this way that a row they cache
changed: a commit reaches every process within milliseconds. NOTIFY is not durable (a notification
sent while the connection is down is lost), so every (re)connect is reported as "anything may have
changed" (``on_notify(None)``); the caller's timer or TTL covers what is left (a connection that
dies silently). While the connection is down the caller keeps serving what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import psycopg
from psycopg import sql

from shared.db.conninfo import DB_CONNECT_TIMEOUT

log = logging.getLogger("blametrail.db.listen")

INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 10.0


class Listener:
    """Calls ``on_notify(payload)`` for each notification on ``channel`` and ``on_notify(None)`` once
    listening (again). ``listening`` is set while the connection is up. ``name`` says in the logs
    whose connection it is."""

    def __init__(self, libpq_url: str, channel: str, on_notify: Callable[[str | None], None], *, name: str) -> None:
        self._libpq_url = libpq_url
        self._channel = channel
        self._on_notify = on_notify
        self._name = name
        self.listening = asyncio.Event()

    async def run(self) -> None:
        """Listen until cancelled."""
        backoff = INITIAL_BACKOFF
        while True:
            try:
                await self._listen_once()
                raise ConnectionError("the notification stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                was_listening = self.listening.is_set()
                self.listening.clear()
                if was_listening:
                    backoff = INITIAL_BACKOFF
                log.warning("%s LISTEN connection lost (%r); reconnecting in %.1fs", self._name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _listen_once(self) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self._libpq_url, autocommit=True, connect_timeout=DB_CONNECT_TIMEOUT
        )
        async with conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            # Listening from here on; what changed before (while we were not listening) is unknown.
            self.listening.set()
            self._on_notify(None)
            async for notify in conn.notifies():
                self._on_notify(notify.payload)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """:meth:`run` in a task while the block runs."""
        task = asyncio.create_task(self.run(), name=f"{self._name}-listen")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
