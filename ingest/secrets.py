"""In-process caches of per-org credentials with a short TTL: no database query per request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.orgs import legacy_token_hash, org_secrets
from shared.secrets import KeyRing, key_ring

log = logging.getLogger("blametrail.ingest")

V = TypeVar("V")
MAX_ENTRIES = 100_000
STALE_RETRY_SECONDS = 1.0


class OrgCache(Generic[V]):
    """``get(org)`` → ``load(session, org)``, cached for ``ttl`` seconds per org.

    Misses (unknown orgs, None) are cached too, so a flood of bad URLs cannot turn into a flood of
    queries; concurrent misses of one org share one query. A change in the database takes effect
    within ``ttl``. When the database fails, a stale value is served if there is one (logged; the
    database is asked again after ``STALE_RETRY_SECONDS``); otherwise the error propagates.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        ttl: float,
        load: Callable[[AsyncSession, str], Awaitable[V]],
    ) -> None:
        self._sessions = sessions
        self._ttl = ttl
        self._load = load
        self._entries: dict[str, tuple[float, V]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, org: str) -> V:
        entry = self._entries.get(org)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        lock = self._locks.setdefault(org, asyncio.Lock())
        async with lock:
            entry = self._entries.get(org)
            if entry is not None and entry[0] > time.monotonic():
                return entry[1]
            try:
                async with self._sessions() as session:
                    value = await self._load(session, org)
            except Exception as exc:
                if entry is None:
                    raise
                log.warning("database unavailable (%r): using cached credentials of org %s", exc, org)
                # Keep serving them for a while: during an outage, one attempt per org per interval,
                # not one (with its connect wait) per webhook.
                self._entries[org] = (time.monotonic() + min(self._ttl, STALE_RETRY_SECONDS), entry[1])
                return entry[1]
            finally:
                self._locks.pop(org, None)
            if len(self._entries) > MAX_ENTRIES:
                self._entries.clear()
            self._entries[org] = (time.monotonic() + self._ttl, value)
            return value


class SecretCache(OrgCache[tuple[str, ...] | None]):
    """The org's valid webhook secrets (current, previous) or None for an unknown org.

    The stored values are encrypted: they are decrypted when an org's entry loads, never per request.
    The key ring (``BLAMETRAIL_SECRET_KEYS``) is read when the cache is made, so a bad key stops ingest
    at startup. A value no key opens fails the load like a database error (a stale entry is served).
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], ttl: float, keys: KeyRing | None = None) -> None:
        ring = keys or key_ring()

        async def load(session: AsyncSession, org: str) -> tuple[str, ...] | None:
            return await org_secrets(session, org, ring)

        super().__init__(sessions, ttl, load)


class LegacyTokenCache(OrgCache[str | None]):
    """Hex SHA-256 of the org's legacy WebHooks plugin token, or None when unknown or turned off."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], ttl: float) -> None:
        super().__init__(sessions, ttl, legacy_token_hash)
