"""Ingest in-process against the real broker: producer replacement, and the answers when nothing is durable."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ingest.app import create_app
from ingest.async_spool import AsyncSpool
from ingest.publish import Outcome, Publisher
from ingest.record import RawRecord
from shared import events
from shared.kafka import make_producer
from shared.producer import Producer
from shared.settings import Settings
from shared.topics import Topics
from tests.support import free_port, signed_headers, wait_until
from tests.support.ingest import new_org
from tests.support.kafka import TopicReader
from tests.support.metrics import local as counter

pytestmark = pytest.mark.integration


@pytest.fixture
async def raw(topics: Settings) -> AsyncIterator[TopicReader]:
    reader = TopicReader(topics.kafka_bootstrap, [Topics.from_settings(topics).raw])
    await reader.start()
    yield reader
    await reader.stop()


async def test_a_replaced_producer_loses_nothing(topics: Settings, raw: TopicReader, tmp_path: Path) -> None:
    topic = Topics.from_settings(topics).raw
    spool = await AsyncSpool.open(tmp_path, topic, 1 << 24)

    def factory() -> Producer:
        producer: Producer = make_producer(topics, client_id="test-ingest")
        return producer

    publisher = Publisher(
        spool, factory, topic=topic, publish_timeout=0.3, max_inflight=1000, bootstrap=topics.kafka_bootstrap
    )
    restarts = counter("blametrail_ingest_producer_restarts_total")
    await publisher.start()
    try:
        assert publisher.producer_connected
        run = os.urandom(4).hex()
        messages = [
            RawRecord(f"restart-{run}/{n % 4}".encode(), f"{run}-{n}".encode(), (
                (events.H_DELIVERY_ID, f"{run}-{n}".encode()),), time.time())
            for n in range(200)
        ]  # fmt: skip

        async def publish_all() -> list[Outcome]:
            return [await publisher.publish(m) for m in messages]

        sending = asyncio.create_task(publish_all())
        await wait_until(lambda: _true(len(raw.records) > 0), within=30, what="the first records")
        publisher.producers.request_restart(publisher.producers.producer, "test: replace it mid-traffic")
        outcomes = await sending
        assert set(outcomes) <= {Outcome.ACCEPTED, Outcome.SPOOLED}
        await wait_until(lambda: _true(publisher.producer_connected), within=30, what="a new producer")
        assert counter("blametrail_ingest_producer_restarts_total") == restarts + 1

        records = await raw.wait_for({m.value.decode() for m in messages})
        for key in {m.key for m in messages}:
            sent = [m.value.decode() for m in messages if m.key == key]
            assert sorted(sent, key=lambda d: records[d].offset) == sent, "a key's records out of order"
        await wait_until(lambda: _true(publisher.spool.depth == 0), within=30, what="empty spool")
    finally:
        await publisher.close()


async def test_without_kafka_a_full_spool_answers_503_and_is_not_ready(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    settings = migrated.model_copy(
        update={
            "kafka_bootstrap": f"127.0.0.1:{free_port()}",  # nothing listens
            "spool_dir": str(tmp_path),
            "spool_max_bytes": 1024 * 1024,
            "max_body_bytes": 256 * 1024,
        }
    )
    org = await new_org(sessions, f"full-{os.urandom(4).hex()}")
    app = create_app(settings)
    before = counter("blametrail_ingest_requests_total", resource="issue", outcome="unavailable")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and "kafka producer not connected; spool writable" in ready.text

            statuses = []
            for n in range(5):
                body = b'{"n":%d,"pad":"%s"}' % (n, b"x" * 240_000)
                response = await client.post(
                    f"/webhooks/sentry/{org.org}",
                    content=body,
                    headers=signed_headers(org.client_secret, body, "issue"),
                )
                statuses.append((response.status_code, response.json()))
            assert statuses[:4] == [(200, {"status": "spooled"})] * 4
            status, error = statuses[4]
            assert status == 503 and error["error"]["code"] == "unavailable"

            response = await client.post(
                f"/webhooks/sentry/{org.org}", content=b"{}", headers=signed_headers(org.client_secret, b"{}", "issue")
            )
            assert response.status_code == 200  # a small one still fits
            body = b'{"pad":"%s"}' % (b"y" * 200_000)
            refused = await client.post(
                f"/webhooks/sentry/{org.org}", content=body, headers=signed_headers(org.client_secret, body, "issue")
            )
            assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
            assert counter("blametrail_ingest_requests_total", resource="issue", outcome="unavailable") == before + 2

            ready = await client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert "not connected" in ready.text and "not writable" in ready.text
            assert (await client.get("/healthz")).status_code == 200


async def _true(value: bool) -> bool:
    return value


def test_a_linger_over_half_the_publish_timeout_is_refused(settings: Settings) -> None:
    with pytest.raises(ValidationError, match="ingest_linger_ms"):
        Settings(**{**settings.model_dump(), "publish_timeout_ms": 300, "ingest_linger_ms": 151})
    assert Settings(**{**settings.model_dump(), "publish_timeout_ms": 300, "ingest_linger_ms": 150})


async def test_ingest_holds_a_record_for_its_linger_before_sending_it(
    topics: Settings, sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    linger = 0.4  # far above a lone record's round trip to the broker (a few ms)
    settings = topics.model_copy(
        update={"ingest_linger_ms": int(linger * 1000), "publish_timeout_ms": 5000, "spool_dir": str(tmp_path)}
    )
    org = await new_org(sessions, f"linger-{os.urandom(4).hex()}")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
            answers = []
            for n in range(2):  # the first also waits for the producer's metadata
                body = b'{"linger":%d,"org":"%s"}' % (n, org.org.encode())
                started = time.monotonic()
                response = await client.post(
                    f"/webhooks/sentry/{org.org}",
                    content=body,
                    headers=signed_headers(org.client_secret, body, "issue"),
                )
                answers.append((response.status_code, response.json(), time.monotonic() - started))
    for status, answer, took in answers:
        assert (status, answer) == (200, {"status": "accepted"}), answers
        assert took >= linger, f"answered after {took:.3f} s: the producer did not hold the record {linger} s"
