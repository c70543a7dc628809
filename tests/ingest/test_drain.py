"""The drainer against a fake broker: a record Kafka refuses for good is isolated and parked.

Drain order per key (and the one-partition-per-key rule) is checked with the publisher in
test_publish.py, and on the real broker in test_kafka.py and test_outage.py.
"""

from __future__ import annotations

from ingest.publish import Outcome
from ingest.spool_files import parked_rows
from tests.ingest.fake_kafka import Harness, drained, record


async def test_a_record_kafka_refuses_for_good_is_parked_not_blocking(harness: Harness) -> None:
    broker = harness.broker
    broker.mode = "hang"
    for n in range(1, 5):
        assert await harness.publisher.publish(record(n)) is Outcome.SPOOLED
    broker.reject_value = b"m0002"
    broker.recover()
    await drained(harness)
    assert broker.values() == [b"m0001", b"m0003", b"m0004"]
    assert harness.publisher.spool.depth == 0
    assert parked_rows(harness.spool_dir) == 1  # m0002 is parked in the spool file, not lost
