"""Fixtures for tests against the real Kafka broker and PostgreSQL started by scripts/test.sh."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared.credentials import Connections
from shared.db.conninfo import libpq_url
from shared.db.session import create_engine, sessionmaker
from shared.settings import Settings

if TYPE_CHECKING:
    from tests.support.outage import Broker


def _require_services() -> None:
    missing = [v for v in ("BLAMETRAIL_KAFKA_BOOTSTRAP", "BLAMETRAIL_DATABASE_URL") if not os.environ.get(v)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not set: run the tests with scripts/test.sh, which starts Kafka and Postgres"
        )


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for this test session: real services, topics, groups and an ingest spool of our own."""
    _require_services()
    prefix = f"test-{uuid.uuid4().hex[:8]}."
    return Settings(
        spool_dir=str(tmp_path_factory.mktemp("spool")),
        topic_prefix=prefix,
        topic_partitions=3,
        router_group=prefix + "router",
        writer_group=prefix + "writer",
        public_url="http://127.0.0.1:8000",
    )


@pytest.fixture(scope="session")
def migrated(settings: Settings) -> Settings:
    from shared.db.migrate import upgrade

    upgrade(settings)
    return settings


@pytest.fixture(scope="session")
async def engine(migrated: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(migrated)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return sessionmaker(engine)


@pytest.fixture(scope="session")
async def topics(migrated: Settings) -> Settings:
    from shared.kafka import create_topics

    await create_topics(migrated)
    return migrated


@pytest.fixture(scope="session")
async def credentials(migrated: Settings) -> AsyncIterator[Connections]:
    """What ingest reads credentials through (plain psycopg), on the test database."""
    connections = Connections(libpq_url(migrated))
    yield connections
    await connections.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A Kafka broker of the module's own (``scripts/kafka.sh`` in a run directory of its own), for
    tests that stop and start it; other tests share the session's broker."""
    from tests.support.outage import Broker

    own = Broker(tmp_path_factory.mktemp("kafka-run"))
    own.start()
    try:
        yield own
    finally:
        own.shutdown()


@pytest.fixture
def unique_slug() -> Iterator[str]:
    yield f"org-{uuid.uuid4().hex[:10]}"
