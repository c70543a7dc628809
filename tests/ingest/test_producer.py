"""Producer supervision against a fake broker: a broken or stuck producer is replaced, nothing is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ingest import producer as producer_module
from ingest.publish import Outcome
from tests.ingest.fake_kafka import FakeBroker, Harness, drained, make, record, true
from tests.support import wait_until
from tests.support.metrics import local as counter


async def test_a_fatal_producer_error_recreates_the_producer(harness: Harness) -> None:
    broker = harness.broker
    restarts = counter("blametrail_ingest_producer_restarts_total")
    broker.mode = "fail"  # aiokafka issue 1017: every send fails after a broker restart
    assert await harness.publisher.publish(record(1)) is Outcome.SPOOLED
    await wait_until(lambda: true(len(broker.producers) >= 2), within=5, what="a second producer")
    assert counter("blametrail_ingest_producer_restarts_total") - restarts >= 1
    assert broker.producers[0].stopped
    broker.mode = "up"
    await drained(harness)
    assert broker.values() == [b"m0001"]
    assert all(p.producer is not broker.producers[0] for p in broker.pending)


async def test_a_producer_without_progress_while_kafka_is_reachable_is_recreated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(producer_module, "STUCK_AFTER", 0.5)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    broker = FakeBroker()
    h = await make(tmp_path, broker, max_inflight=10, bootstrap=f"127.0.0.1:{port}")
    try:
        broker.mode = "hang"  # connections accepted, nothing acknowledged: a stuck producer
        assert await h.publisher.publish(record(1)) is Outcome.SPOOLED
        await wait_until(lambda: true(len(broker.producers) >= 2), within=10, what="a recreated producer")
        broker.recover()
        await drained(h)
    finally:
        await h.publisher.close()
        server.close()
        await server.wait_closed()
