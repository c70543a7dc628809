"""In-process caches of per-org credentials: no database query per request, changes live at once.

A change of an org or of its Sentry integration (``org create``, ``set-secret``, ``rotate-secret``,
legacy plugin on/off) fires a NOTIFY on the mappings channel (migration 0005); ingest LISTENs there
(``shared.db.listen``) and marks every cached entry due for reloading. The TTL stays as the fallback
for a notification lost while the LISTEN connection was down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import orjson

from shared.credentials import Connections, legacy_token_hash, org_secrets
from shared.secrets import KeyRing, key_ring

log = logging.getLogger("blametrail.ingest")

V = TypeVar("V")
MAX_ENTRIES = 100_000
STALE_RETRY_SECONDS = 1.0
# A request waits at most this long for its org's credentials (the lock of a load in flight, then
# the query): a database that hangs must not hold a webhook past Sentry's 1 s budget. Past it the
# stale value is served, or 503 when there is none.
LOAD_WAIT_SECONDS = 0.5
# Notifications on the mappings channel that concern credentials: statement-level triggers on these
# tables (their payload names no org). Mapping changes (payload with ``mapping_id``) do not.
CREDENTIAL_TABLES = frozenset({"organizations", "sentry_integrations"})


class OrgCache(Generic[V]):
    """``get(org)`` → ``load(connections, org)``, cached for ``ttl`` seconds per org or until :meth:`invalidate`.

    Misses (unknown orgs, None) are cached too, so a flood of bad URLs cannot turn into a flood of
    queries; concurrent misses of one org share one query. When the database fails or takes longer
    than ``wait`` seconds, a stale value is served if there is one (logged; the database is asked again
    after ``STALE_RETRY_SECONDS``); otherwise the error (or ``TimeoutError``) propagates.
    """

    def __init__(
        self,
        connections: Connections,
        ttl: float,
        load: Callable[[Connections, str], Awaitable[V]],
        wait: float = LOAD_WAIT_SECONDS,
    ) -> None:
        self._connections = connections
        self._ttl = ttl
        self._load = load
        self._wait = wait
        # org → (fresh until, generation loaded in, value); fresh only in the current generation.
        self._entries: dict[str, tuple[float, int, V]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._generation = 0

    def invalidate(self) -> None:
        """Every entry is due for reloading, also one whose load is in flight now; the values stay
        as the stale fallback for when the database cannot answer."""
        self._generation += 1

    def _fresh(self, org: str) -> tuple[float, int, V] | None:
        entry = self._entries.get(org)
        if entry is not None and entry[0] > time.monotonic() and entry[1] == self._generation:
            return entry
        return None

    async def get(self, org: str) -> V:
        entry = self._fresh(org)
        if entry is not None:
            return entry[2]
        try:
            async with asyncio.timeout(self._wait):
                return await self._refresh(org)
        except Exception as exc:
            stale = self._entries.get(org)
            if stale is None:
                raise
            log.warning("database unavailable (%r): using cached credentials of org %s", exc, org)
            # Keep serving them for a while: during an outage, one attempt per org per interval,
            # not one (with its connect wait) per webhook.
            self._entries[org] = (time.monotonic() + min(self._ttl, STALE_RETRY_SECONDS), self._generation, stale[2])
            return stale[2]

    async def _refresh(self, org: str) -> V:
        lock = self._locks.setdefault(org, asyncio.Lock())
        async with lock:
            entry = self._fresh(org)
            if entry is not None:
                return entry[2]
            generation = self._generation
            try:
                value = await self._load(self._connections, org)
            finally:
                self._locks.pop(org, None)
            if len(self._entries) > MAX_ENTRIES:
                self._entries.clear()
            self._entries[org] = (time.monotonic() + self._ttl, generation, value)
            return value


class SecretCache(OrgCache[tuple[str, ...] | None]):
    """The org's valid webhook secrets (current, previous) or None for an unknown org.

    The stored values are encrypted: they are decrypted when an org's entry loads, never per request.
    The key ring (``BLAMETRAIL_SECRET_KEYS``) is read when the cache is made, so a bad key stops ingest
    at startup. A value no key opens fails the load like a database error (a stale entry is served).
    """

    def __init__(self, connections: Connections, ttl: float, keys: KeyRing | None = None) -> None:
        ring = keys or key_ring()

        async def load(connections: Connections, org: str) -> tuple[str, ...] | None:
            return await org_secrets(connections, org, ring)

        super().__init__(connections, ttl, load)


class LegacyTokenCache(OrgCache[str | None]):
    """Hex SHA-256 of the org's legacy WebHooks plugin token, or None when unknown or turned off."""

    def __init__(self, connections: Connections, ttl: float) -> None:
        super().__init__(connections, ttl, legacy_token_hash)


def concerns_credentials(payload: str | None) -> bool:
    """Whether a notification on the mappings channel may change credentials: an org or integration
    change, a (re)connect (``None``: what happened meanwhile is unknown), or a payload not understood."""
    if payload is None:
        return True
    try:
        decoded = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return True
    if not isinstance(decoded, dict):
        return True
    return decoded.get("table") in CREDENTIAL_TABLES or "mapping_id" not in decoded


def invalidator(caches: Sequence[OrgCache[Any]]) -> Callable[[str | None], None]:
    """The ``on_notify`` of ingest's LISTEN connection: invalidate ``caches`` when credentials may have changed."""

    def on_notify(payload: str | None) -> None:
        if concerns_credentials(payload):
            for cache in caches:
                cache.invalidate()

    return on_notify
