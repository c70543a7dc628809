"""The publisher's decisions against a fake broker: ack, spool, order behind the spool, limits, shutdown.

The real broker is in test_kafka.py and test_outage.py; these pin down each rule quickly and
deterministically.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ingest import publish
from ingest.publish import Outcome, Unavailable
from ingest.spool_files import spooled_rows
from tests.ingest.fake_kafka import TIMEOUT, FakeBroker, Harness, drained, make, record, true
from tests.support import wait_until
from tests.support.metrics import local as counter


async def test_acknowledged_publish_is_accepted_directly(harness: Harness) -> None:
    assert await harness.publisher.publish(record(1)) is Outcome.ACCEPTED
    assert harness.broker.values() == [b"m0001"]
    assert harness.publisher.spool.depth == 0


async def test_no_ack_in_time_spools_later_ones_follow_and_drain_in_order(harness: Harness) -> None:
    broker = harness.broker
    drained_before = counter("blametrail_ingest_spool_drained_total")
    broker.mode = "hang"
    started = time.monotonic()
    sent = [record(1)]
    assert await harness.publisher.publish(sent[0]) is Outcome.SPOOLED
    assert time.monotonic() - started >= TIMEOUT
    for n in range(2, 14):  # other keys too: while the spool has rows, nothing goes around it
        sent.append(record(n, key=f"org/{n % 3}"))
        assert await harness.publisher.publish(sent[-1]) is Outcome.SPOOLED
    assert broker.direct_sends == 1
    assert harness.publisher.spool.depth == 13

    broker.recover()
    await drained(harness)
    expected: dict[bytes, list[bytes]] = {}
    for m in sent:
        expected.setdefault(m.key, []).append(m.value)
    assert broker.per_key() == expected
    assert counter("blametrail_ingest_spool_drained_total") - drained_before == 13
    # one key, one partition, whichever path it took
    by_key = {k: {p for p, k2, _ in broker.log if k2 == k} for _, k, _ in broker.log}
    assert all(len(parts) == 1 for parts in by_key.values())

    assert await harness.publisher.publish(record(8)) is Outcome.ACCEPTED
    assert broker.direct_sends == 2


async def test_other_issues_go_around_a_spool_that_holds_one_once_kafka_acknowledges_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish, "PROBE_INTERVAL", 0.05)
    broker, publisher = harness.broker, harness.publisher
    broker.mode = "hang"
    a1 = record(1, key="org/a")
    assert await publisher.publish(a1) is Outcome.SPOOLED
    # Kafka acknowledges direct sends again, but the drainer's batches hang: issue a stays spooled.
    broker.mode, broker.hang_batches = "up", True
    await asyncio.sleep(0.06)  # past the probe interval
    b1, a2, c1 = record(2, key="org/b"), record(3, key="org/a"), record(4, key="org/c")
    assert await publisher.publish(b1) is Outcome.ACCEPTED  # the probe: acknowledged, Kafka is healthy
    assert await publisher.publish(a2) is Outcome.SPOOLED  # behind issue a's spooled event
    assert await publisher.publish(c1) is Outcome.ACCEPTED
    assert publisher.spool.depth == 2 and broker.direct_sends == 3

    broker.recover()
    await drained(harness)
    assert broker.per_key()[b"org/a"] == [a1.value, a2.value]
    assert broker.per_key()[b"org/b"] == [b1.value] and broker.per_key()[b"org/c"] == [c1.value]
    assert not publisher.spool.may_hold(b"org/a")
    assert await publisher.publish(record(5, key="org/a")) is Outcome.ACCEPTED


async def test_while_kafka_hangs_one_direct_send_a_probe_interval_tests_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish, "PROBE_INTERVAL", 0.3)
    broker, publisher = harness.broker, harness.publisher
    broker.mode = "hang"
    assert await publisher.publish(record(1, key="org/a")) is Outcome.SPOOLED
    assert await publisher.publish(record(2, key="org/b")) is Outcome.SPOOLED
    assert broker.direct_sends == 1  # within the interval: straight to the spool

    await asyncio.sleep(0.3)
    probe = asyncio.create_task(publisher.publish(record(3, key="org/c")))
    await wait_until(lambda: true(broker.direct_sends == 2), within=5, what="the probe's send")
    assert not probe.done()
    assert await publisher.publish(record(4, key="org/d")) is Outcome.SPOOLED  # one probe at a time
    assert await probe is Outcome.SPOOLED  # the probe timed out too
    assert broker.direct_sends == 2
    broker.recover()
    await drained(harness)
    assert len(broker.values()) == 4


async def test_past_the_inflight_limit_webhooks_are_spooled_at_once(tmp_path: Path) -> None:
    h = await make(tmp_path, FakeBroker(mode="hang"), max_inflight=1)
    try:
        first = asyncio.create_task(h.publisher.publish(record(1)))
        await wait_until(lambda: true(h.broker.direct_sends == 1), within=5, what="first send")
        started = time.monotonic()
        assert await h.publisher.publish(record(2, key="org/2")) is Outcome.SPOOLED
        assert time.monotonic() - started < TIMEOUT
        assert await first is Outcome.SPOOLED
        h.broker.recover()
        await drained(h)
        assert h.broker.values() == [b"m0001", b"m0002"]
    finally:
        await h.publisher.close()


async def test_full_spool_tries_kafka_once_more_then_answers_unavailable(tmp_path: Path) -> None:
    size = record(1).size
    h = await make(tmp_path, FakeBroker(mode="hang"), max_bytes=2 * size)
    try:
        assert await h.publisher.publish(record(1)) is Outcome.SPOOLED
        assert await h.publisher.publish(record(2)) is Outcome.SPOOLED
        with pytest.raises(Unavailable):
            await h.publisher.publish(record(3))  # full, and Kafka does not answer either
        h.broker.mode = "up"
        h.broker.hang_batches = True  # Kafka is back, the drainer is not through yet
        assert await h.publisher.publish(record(4)) is Outcome.ACCEPTED  # durability over order
        h.broker.recover()
        await drained(h)
        # m0003 was answered 503, yet its timed-out send may still land: a 503 promises nothing either way
        assert {b"m0001", b"m0002", b"m0004"} <= set(h.broker.values())
    finally:
        await h.publisher.close()


async def test_without_kafka_at_start_webhooks_are_spooled_then_delivered(tmp_path: Path) -> None:
    h = await make(tmp_path, FakeBroker(refuse_start=True))
    try:
        assert not h.publisher.producer_connected and h.publisher.spool_writable
        assert await h.publisher.publish(record(1)) is Outcome.SPOOLED
        h.broker.refuse_start = False
        await drained(h)
        assert h.publisher.producer_connected
        assert h.broker.values() == [b"m0001"]
    finally:
        await h.publisher.close()


async def test_close_keeps_unsent_rows_in_the_spool(tmp_path: Path) -> None:
    h = await make(tmp_path, FakeBroker(mode="hang"))
    for n in range(3):
        assert await h.publisher.publish(record(n)) is Outcome.SPOOLED
    started = time.monotonic()
    await h.publisher.close()
    assert time.monotonic() - started < 8
    assert spooled_rows(tmp_path) == 3
