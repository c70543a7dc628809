"""Ingest's ASGI app in-process without Postgres or Kafka: fixed credentials, the fake broker.

The endpoints, limits and answers are the real ones (``ingest.app.build_app``); only the credential
caches and the producer are stand-ins, so what reaches a topic is what ``FakeBroker.log`` holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from starlette.applications import Starlette

from ingest.app import IngestState, build_app
from ingest.secrets import LegacyTokenCache, SecretCache
from shared.security import hash_token
from shared.settings import Settings
from shared.topics import Topics
from tests.ingest.fake_kafka import FakeBroker, Harness, make

# Orgs and their secrets (current, previous); acme has the legacy plugin on with LEGACY_TOKEN.
SECRETS = {"acme": ("acme-current-secret", "acme-previous-secret"), "beta": ("beta-secret",)}
LEGACY_TOKEN = "acme-legacy-token"
LEGACY_TOKENS = {"acme": hash_token(LEGACY_TOKEN).hex()}


class FixedSecrets(SecretCache):
    def __init__(self, known: Mapping[str, tuple[str, ...]]) -> None:
        self._known = known

    async def get(self, org: str) -> tuple[str, ...] | None:
        return self._known.get(org)


class FixedLegacyTokens(LegacyTokenCache):
    def __init__(self, known: Mapping[str, str]) -> None:
        self._known = known

    async def get(self, org: str) -> str | None:
        return self._known.get(org)


@contextlib.asynccontextmanager
async def fake_ingest(tmp_path: Path, settings: Settings) -> AsyncIterator[tuple[Starlette, Harness]]:
    """The ingest app (lifespan run) with the fixed orgs, publishing to a fake broker that acknowledges."""
    harness = await make(tmp_path, FakeBroker())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.ingest = IngestState(
            settings=settings,
            topics=Topics.from_settings(settings),
            secrets=FixedSecrets(SECRETS),
            legacy_tokens=FixedLegacyTokens(LEGACY_TOKENS),
            publisher=harness.publisher,
        )
        yield

    app = build_app(lifespan)
    try:
        async with app.router.lifespan_context(app):
            yield app, harness
    finally:
        await harness.publisher.close()
