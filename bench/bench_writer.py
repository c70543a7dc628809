"""Incident writer throughput: N routed events over K incidents, written by one writer (in this process).

Needs the real Kafka broker and Postgres of ``BLAMETRAIL_KAFKA_BOOTSTRAP`` / ``BLAMETRAIL_DATABASE_URL``
(``scripts/postgres.sh start`` and ``scripts/kafka.sh start`` print them). Uses topics and a consumer
group of its own (prefix ``bench-<random>.``) and a new organisation, so it can run beside anything.

    python -m bench.bench_writer --events 50000 --incidents 1000

Produces every event first, then starts the writer and reports events/s from its first write to
its last (then waits for the last offset commit), the batch sizes, and the per-batch write latency.
Checks the result: one audit record per event and exact incident counts. Results: docs/writer.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import Histogram
from sqlalchemy import func, select

from incident_writer.consumer import IncidentWriter
from incident_writer.incidents import IncidentAction, incident_action
from shared import metrics
from shared.db.migrate import upgrade
from shared.db.models import AuditRecord, Incident
from shared.db.session import create_engine, sessionmaker
from shared.events import RawRef, RoutedEvent
from shared.kafka import create_topics, make_producer
from shared.mappings import add_mapping, create_service
from shared.orgs import create_org
from shared.settings import Settings
from shared.topics import Topics

KINDS = [("error", "created")] * 6 + [("event_alert", "triggered"), ("issue", "created"), ("comment", "created")]
LEVELS = ["info", "warning", "error", "fatal"]


def quantile(histogram: Histogram, q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` of an unlabelled histogram."""
    [metric] = histogram.collect()
    samples = {s.labels["le"]: s.value for s in metric.samples if s.name.endswith("_bucket")}
    total = samples["+Inf"]
    for bound, count in sorted(((float(le), n) for le, n in samples.items()), key=lambda x: x[0]):
        if count >= q * total:
            return bound
    return float("inf")


def histogram_sum_count(histogram: Histogram, **labels: str) -> tuple[float, float]:
    [metric] = histogram.collect()
    values = {
        s.name: s.value
        for s in metric.samples
        if s.name.endswith(("_sum", "_count")) and all(s.labels.get(k) == v for k, v in labels.items())
    }
    return values[metric.name + "_sum"], values[metric.name + "_count"]


async def committed(settings: Settings) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="bench")
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(settings.writer_group)
    finally:
        await admin.close()
    return sum(meta.offset for meta in offsets.values() if meta.offset > 0)


async def main(events: int, incidents: int, services: int, batch_max: int, seed: int) -> None:
    base = Settings()
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    settings = base.model_copy(
        update={"topic_prefix": prefix, "writer_group": prefix + "writer", "consumer_batch_max": batch_max}
    )
    await asyncio.to_thread(upgrade, settings)
    await create_topics(settings)
    engine = create_engine(settings)
    sessions = sessionmaker(engine)
    async with sessions() as session, session.begin():
        org = await create_org(session, f"bench-{uuid.uuid4().hex[:8]}")
        targets = []
        for i in range(services):
            service = await create_service(session, org.org_id, f"Service {i}")
            mapping = await add_mapping(session, org.org_id, f"proj-{i}", service.id)
            targets.append((service.id, mapping.id, f"proj-{i}"))

    rng = random.Random(seed)
    start = datetime(2026, 11, 1, tzinfo=UTC)
    expected: dict[tuple[int, str], int] = {}
    topic = Topics.from_settings(settings).routed
    producer = make_producer(settings, client_id="bench", linger_ms=50)
    await producer.start()
    produce_started = time.perf_counter()
    try:
        futures = []
        for i in range(events):
            issue = rng.randrange(incidents)
            service_id, mapping_id, project = targets[issue % services]
            resource, action = rng.choice(KINDS)
            event = RoutedEvent(
                delivery_id=uuid.uuid4().hex + uuid.uuid4().hex,
                org=org.org,
                resource=resource,
                action=action,
                project_slug=project,
                sentry_issue_id=str(issue),
                incident_key=f"issue:{issue}",
                title=f"TypeError in handler {issue}",
                level=rng.choice(LEVELS),
                culprit="app.handlers in handle",
                web_url=f"https://sentry.io/organizations/{org.org}/issues/{issue}/",
                occurred_at=start + timedelta(seconds=i),
                received_at=start + timedelta(seconds=i, milliseconds=200),
                raw=RawRef(topic="sentry.webhooks.raw", partition=0, offset=i),
                service_id=service_id,
                mapping_id=mapping_id,
            )
            if incident_action(resource, action) is IncidentAction.OCCURRENCE:
                incident = (service_id, f"issue:{issue}")
                expected[incident] = expected.get(incident, 0) + 1
            key = f"{org.org}/{issue}".encode()
            futures.append(await producer.send(topic, value=event.model_dump_json().encode(), key=key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    print(f"produced {events} events over {incidents} incidents in {time.perf_counter() - produce_started:.1f}s")

    async def audited() -> int:
        async with sessions() as session:
            return int(await session.scalar(select(func.count()).where(AuditRecord.org_id == org.org_id)) or 0)

    writer = IncidentWriter(settings)
    stop = asyncio.Event()
    run = asyncio.create_task(writer.run(stop))
    started = time.perf_counter()
    first_write = None
    # Light polling (the writer runs in this process): audit records first, offsets at the end.
    while first_write is None or await audited() < events:
        await asyncio.sleep(0.02 if first_write is None else 0.25)
        if run.done():
            run.result()
        if first_write is None and await audited() > 0:
            first_write = time.perf_counter()
    done = time.perf_counter()
    while True:  # the last offsets are committed right after the last transaction
        if await committed(settings) >= events:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await run

    async with sessions() as session:
        counts = {
            (s, k): n
            for s, k, n in await session.execute(
                select(Incident.service_id, Incident.incident_key, Incident.event_count).where(
                    Incident.org_id == org.org_id
                )
            )
        }
    audit_records = await audited()
    await engine.dispose()
    seconds = done - (first_write or started)
    write_sum, batches = histogram_sum_count(metrics.WRITER_BATCH_SECONDS)
    size_sum, size_count = histogram_sum_count(metrics.CONSUMER_BATCH_SIZE, group=settings.writer_group)
    print(f"writer: {events} events in {seconds:.2f}s = {events / seconds:,.0f} events/s (first write → last write)")
    print(f"        {done - started:.2f}s including start-up and group join")
    print(f"batches: {int(batches)}, mean size {size_sum / max(size_count, 1):.0f} (max {batch_max})")
    print(
        f"batch write latency: mean {1000 * write_sum / max(batches, 1):.1f} ms, "
        f"p50 ≤ {1000 * quantile(metrics.WRITER_BATCH_SECONDS, 0.5):.0f} ms, "
        f"p95 ≤ {1000 * quantile(metrics.WRITER_BATCH_SECONDS, 0.95):.0f} ms, "
        f"p99 ≤ {1000 * quantile(metrics.WRITER_BATCH_SECONDS, 0.99):.0f} ms"
    )
    ok = counts == expected and audit_records == events
    print(f"check: {audit_records} audit records, {len(counts)} incidents, counts {'exact' if ok else 'WRONG'}")
    if not ok:
        raise SystemExit(1)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--incidents", type=int, default=1_000)
    parser.add_argument("--services", type=int, default=10)
    parser.add_argument("--batch-max", type=int, default=Settings().consumer_batch_max)
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args()


if __name__ == "__main__":
    args = parse()
    asyncio.run(main(args.events, args.incidents, args.services, args.batch_max, args.seed))
