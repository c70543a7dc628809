"""CPU of ingest's publish path alone: ``Publisher.publish`` to the stack's Kafka, in this process.

A closed loop of ``--concurrency`` publishes at a time (as wrk's connections), each a distinct
2.4 KB record over 1,000 keys, to a topic of its own; no HTTP, no other process of ours. Reported:
CPU microseconds a publish (``time.process_time`` over the run: this process only, so far less noisy
than a whole stack's figures), publishes/s, produce requests and records per request. Every publish
must be acknowledged by Kafka (``accepted``); a run where any was spooled is reported as such.

    python -m bench.publish_path --stack /tmp/bt-bench --records 30000

Used to compare changes to the publish path (``ingest/publish.py``) on a machine whose saturation
figures swing by ±20 % between identical runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop
from aiokafka.conn import AIOKafkaConnection

from bench.stack import read_env
from ingest.async_spool import AsyncSpool
from ingest.kafka import ingest_producer
from ingest.publish import Publisher
from ingest.record import RawRecord
from shared.kafka import create_topics
from shared.settings import Settings
from shared.topics import Topics


class RequestCount:
    """Produce requests sent by every aiokafka connection of this process while installed."""

    def __init__(self) -> None:
        self.produce = 0
        self._original = AIOKafkaConnection.send

    def __enter__(self) -> RequestCount:
        original, count = self._original, self

        def send(conn: AIOKafkaConnection, request: Any, expect_response: bool = True) -> Any:
            if type(request).__name__.startswith("ProduceRequest"):
                count.produce += 1
            return original(conn, request, expect_response)

        AIOKafkaConnection.send = send
        return self

    def __exit__(self, *exc: object) -> None:
        AIOKafkaConnection.send = self._original


async def measure(bootstrap: str, records: int, concurrency: int) -> dict[str, Any]:
    settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=f"bench-pub-{uuid.uuid4().hex[:8]}.")
    await create_topics(settings)
    topic = Topics.from_settings(settings).raw
    body = json.dumps({"bench": "x" * 2400}).encode()
    work = [
        RawRecord(b"demo/%d" % (n % 1000), body[:-2] + b'%d"}' % n, (("org", b"demo"),), time.time())
        for n in range(records)
    ]
    with tempfile.TemporaryDirectory() as spool_dir:
        spool = await AsyncSpool.open(Path(spool_dir), topic, 1 << 28)
        publisher = Publisher(
            spool,
            lambda: ingest_producer(settings, client_id="bench-publish"),
            topic=topic,
            publish_timeout=settings.publish_timeout_ms / 1000,
            max_inflight=settings.ingest_max_inflight,
            bootstrap=bootstrap,
        )
        await publisher.start(10)
        try:
            outcomes: Counter[str] = Counter()

            async def run(batch: list[RawRecord]) -> None:
                queue = iter(batch)

                async def worker() -> None:
                    for record in queue:
                        outcomes[(await publisher.publish(record)).value] += 1

                await asyncio.gather(*(worker() for _ in range(concurrency)))

            await run(work[: min(2000, records)])  # warm-up: connections, metadata, the hash cache
            for _ in range(600):  # what the warm-up spooled is drained first (at most 60 s)
                if not publisher.spool.depth:
                    break
                await asyncio.sleep(0.1)
            outcomes.clear()
            with RequestCount() as count:
                cpu, started = time.process_time(), time.perf_counter()
                await run(work)
                cpu, took = time.process_time() - cpu, time.perf_counter() - started
        finally:
            await publisher.close()
    return {
        "records": records,
        "concurrency": concurrency,
        "cpu_us_per_publish": round(cpu * 1e6 / records, 1),
        "publishes_per_s": round(records / took),
        "produce_requests": count.produce,
        "records_per_request": round(records / max(1, count.produce), 1),
        "outcomes": dict(outcomes),
        "all_accepted": outcomes == Counter(accepted=records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", type=Path, default=Path("/tmp/bt-bench"))
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    bootstrap = read_env(args.stack / "kafka.env")["BLAMETRAIL_KAFKA_BOOTSTRAP"]
    result = uvloop.run(measure(bootstrap, args.records, args.concurrency))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
