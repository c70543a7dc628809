"""CPU of the router's step alone: ``RouterStep.process`` over raw records held in memory, in this process.

The records are the issue's mix (``bench.harness.mixed_bodies``: issue, error, event alert and metric
alert bodies, 80 % naming org ``demo``'s mapped project) with ingest's headers and record keys, in
batches of ``--batch`` as the consumer hands them over. What is measured is the router's own work
on them, ``RouterStep.outputs_of`` and its log lines: read, classify, check, resolve against the
mapping cache (loaded from the stack's database), count, serialise the outputs, format the JSON log
lines (to /dev/null). Not measured, being the same for any consumer: fetching and decompressing
records, producing the outputs (aiokafka's batches, lz4), committing offsets — ``bench.consumers``
measures the whole router. Nothing runs beside it: on this VM, work on the other vCPU (Kafka taking a
produce) slowed this process's CPU by up to 40 %, which made a version that produced useless for
comparisons. Reported: CPU microseconds an event (``time.process_time``) for each of ``--rounds``
passes over the records, and the least of them; and, steadier, that CPU relative to a fixed reference
workload run after every batch (``bench.harness.reference``; the median pass): compare versions by it.

    python -m bench.route_path --stack /tmp/bt-bench --events 30000

Used to compare changes to the router's per-event work (``router/``, ``shared/events.py``,
``shared/sentry.py``) on a machine whose stack-wide figures swing by ±20 % between identical runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, cast

from aiokafka.structs import ConsumerRecord, TopicPartition

from bench.harness import as_ingest_writes, mixed_bodies, reference
from bench.stack import read_env
from router.boundary import TimeWindow
from router.cache import IssueProjects, MappingCache
from router.consumer import RouterStep
from shared.consumer import Batch
from shared.db.conninfo import libpq_url
from shared.db.session import create_engine, sessionmaker
from shared.logs import setup_logging
from shared.producer import RenewableProducer
from shared.runtime import tune_gc
from shared.settings import Settings
from shared.topics import Topics

ORG, PROJECT = "demo", "payments-api"  # the demo org of scripts/up.sh and its mapped project


def raw_records(topic: str, count: int, partitions: int, org: str = ORG) -> list[ConsumerRecord]:
    """``count`` raw records of ``org`` as ingest writes them (headers, key), spread over ``partitions``."""
    out = []
    for n, (resource, body) in enumerate(mixed_bodies(count, project=PROJECT)):
        key, headers = as_ingest_writes(org, resource, body)
        partition, offset, now_ms = n % partitions, n // partitions, int(time.time() * 1000)
        out.append(ConsumerRecord(topic, partition, offset, now_ms, 0, key, body, None, len(key), len(body), headers))
    return out


def batches(records: list[ConsumerRecord], size: int) -> list[Batch]:
    out = []
    for start in range(0, len(records), size):
        per_partition: dict[TopicPartition, list[ConsumerRecord]] = {}
        for record in records[start : start + size]:
            per_partition.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
        out.append(Batch(per_partition))
    return out


async def measure(base: Settings, count: int, batch: int, rounds: int = 5, org: str = ORG) -> dict[str, Any]:
    """``rounds`` passes of the router's work over ``count`` records of ``org`` (which maps :data:`PROJECT`)."""
    topics = Topics.from_settings(base)
    engine = create_engine(base, pool_size=2)
    sessions = sessionmaker(engine)
    cache = MappingCache(sessions, libpq_url(base), base.mapping_refresh_seconds)
    window = TimeWindow.of(base.event_time_before_days, base.event_time_after_hours)
    no_producer = cast(RenewableProducer, None)  # outputs_of produces nothing
    step = RouterStep(cache, IssueProjects(sessions), topics, no_producer, window)
    work = batches(raw_records(topics.raw, count, base.topic_partitions, org), batch)
    await cache.start()
    try:
        outputs = dead = 0
        for b in work[:4]:  # warm-up: the org's mappings, caches
            await step.outputs_of(b)
        step.lines.flush()
        tune_gc()  # as the router runs (shared.runtime): the records are frozen out of collections
        passes = []
        for _ in range(rounds):
            cpu = reference_cpu = 0.0
            for b in work:
                started = time.process_time()
                out, letters = await step.outputs_of(b)
                step.lines.flush()
                between = time.process_time()
                reference(len(b))
                cpu, reference_cpu = cpu + between - started, reference_cpu + time.process_time() - between
                outputs, dead = outputs + len(out), dead + len(letters)
            passes.append((cpu, reference_cpu))
    finally:
        await cache.stop()
        await engine.dispose()
    cpu_us = [round(cpu * 1e6 / count, 1) for cpu, _ in passes]
    relative = [round(cpu / reference_cpu, 3) for cpu, reference_cpu in passes]
    return {
        "events": count,
        "batch": batch,
        "cpu_us_per_event": min(cpu_us),
        "cpu_us_per_event_each_pass": cpu_us,
        "relative_to_reference": sorted(relative)[len(relative) // 2],
        "relative_each_pass": relative,
        "outputs_per_event": round(outputs / (count * rounds), 3),
        "dead_lettered": dead,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", type=Path, default=Path("/tmp/bt-bench"))
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5, help="passes over the records (the least CPU is reported)")
    args = parser.parse_args()
    env = {**read_env(args.stack / "postgres.env"), **read_env(args.stack / "kafka.env")}
    settings = Settings(kafka_bootstrap=env["BLAMETRAIL_KAFKA_BOOTSTRAP"], database_url=env["BLAMETRAIL_DATABASE_URL"])
    setup_logging("INFO", service="router", fmt="json")  # the router's log lines, formatted, to /dev/null
    for handler in logging.getLogger("blametrail").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))  # open for the whole run
    print(json.dumps(asyncio.run(measure(settings, args.events, args.batch, args.rounds)), indent=2))


if __name__ == "__main__":
    main()
