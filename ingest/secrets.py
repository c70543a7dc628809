"""In-process cache of org webhook secrets with a short TTL: no database query per request."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.orgs import org_secrets


class SecretCache:
    """``get(org)`` → the org's valid secrets (current, previous) or None for an unknown org.

    Unknown orgs are cached too, so a flood of bad URLs cannot turn into a flood of queries.
    A rotated secret takes effect within ``ttl`` seconds.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], ttl: float) -> None:
        self._sessions = sessions
        self._ttl = ttl
        self._entries: dict[str, tuple[float, tuple[str, ...] | None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, org: str) -> tuple[str, ...] | None:
        now = time.monotonic()
        entry = self._entries.get(org)
        if entry is not None and entry[0] > now:
            return entry[1]
        lock = self._locks.setdefault(org, asyncio.Lock())
        async with lock:
            entry = self._entries.get(org)
            if entry is not None and entry[0] > time.monotonic():
                return entry[1]
            async with self._sessions() as session:
                value = await org_secrets(session, org)
            if len(self._entries) > 100_000:
                self._entries.clear()
            self._entries[org] = (time.monotonic() + self._ttl, value)
            self._locks.pop(org, None)
            return value
