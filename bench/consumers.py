"""Router and writer throughput draining a pre-filled topic, each beside its ceiling.

On topics of its own (a fresh ``bench-<id>.`` prefix, so the running stack is not disturbed) this
fills the raw topic with ``--events`` records exactly as ingest writes them (ingest's headers and
record keys): mixed resources (issue 50 %, error 20 %, event alert 20 %, metric alert 10 %), 80 %
naming org ``demo``'s mapped project and 20 % a project no mapping names, every time in them now
(``bench.harness.mixed_bodies``), then measures, one after the other:

- **passthrough**: an aiokafka consume → produce loop (same producer settings, batches of 500, every
  send acknowledged, then commit) copying raw to a scratch topic: the ceiling of any consumer step;
- **router**: ``blametrail router`` on that prefix, events/s from its first routed event to the last;
- **writer**: ``blametrail writer`` draining the router's output, events/s likewise;
- **copy**: ``COPY`` of the audit rows the writer wrote into the same table (``audit_records``, a
  distinct delivery id each, then deleted): the ceiling of getting those rows into Postgres, as the
  issue defines it. (Until 2026-12-01 this copied the raw bodies into an unindexed temporary table,
  a ceiling 2-3x higher than any write to the real table could reach.)

CPU of each (process CPU over the same window) is reported per event. ``--profile DIR`` attaches
py-spy (``--nonblocking``: it does not stop the process to sample) to the router and the writer and
writes ``DIR/router.txt`` and ``DIR/writer.txt`` (collapsed stacks, for ``flamegraph.pl`` or
speedscope; their rates are then a profiled run's).

    python -m bench.consumers --stack /tmp/bt-bench --events 20000
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import as_ingest_writes, cpu_seconds, mixed_bodies
from bench.saturation import free_port
from bench.stack import read_env
from incident_writer.store import AUDIT_COLUMNS
from shared.db.conninfo import as_libpq
from shared.kafka import create_topics, make_consumer_producer, make_producer
from shared.settings import Settings
from shared.topics import Topics

BATCH = 500


async def fill(settings: Settings, topic: str, values: list[tuple[str, bytes]]) -> None:
    """``(resource, body)`` records exactly as ingest writes them: its headers, its record key."""
    producer = make_producer(settings, client_id="bench-fill")
    await producer.start()
    try:
        for start in range(0, len(values), BATCH):
            futures = []
            for resource, body in values[start : start + BATCH]:
                key, headers = as_ingest_writes("demo", resource, body)
                futures.append(await producer.send(topic, value=body, key=key, headers=headers))
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def passthrough(settings: Settings, source: str, target: str, count: int) -> dict[str, float]:
    """Consume ``count`` records of ``source``, produce each to ``target``, acks then commit per batch."""
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"{source}.passthrough",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=BATCH,
        fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,  # as the router's (shared.kafka.make_consumer)
        fetch_min_bytes=settings.consumer_fetch_min_bytes,
    )
    producer = make_consumer_producer(settings, client_id="bench-passthrough")  # as the router's
    await consumer.start()
    await producer.start()
    seen = 0
    started = cpu_started = 0.0
    try:
        while seen < count:
            batches = await consumer.getmany(timeout_ms=1000, max_records=BATCH)
            if not started and batches:
                started, cpu_started = time.monotonic(), _own_cpu()
            futures = []
            for records in batches.values():
                for r in records:
                    futures.append(await producer.send(target, value=r.value, key=r.key, headers=list(r.headers)))
            await asyncio.gather(*futures)
            if futures:
                await consumer.commit()
            seen += len(futures)
        took = time.monotonic() - started
        return _rate(count, took, _own_cpu() - cpu_started)
    finally:
        await consumer.stop()
        await producer.stop()


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rate(count: int, seconds: float, cpu: float) -> dict[str, float]:
    return {
        "events": count,
        "seconds": round(seconds, 2),
        "events_per_s": round(count / seconds, 1) if seconds else 0.0,
        "cpu_ms_per_event": round(cpu * 1000 / count, 3) if count else 0.0,
    }


def _counter(url: str, family_name: str) -> float:
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return 0.0
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == family_name
        for s in f.samples
        if s.name.endswith("_total")
    )


def service_drain(
    command: str, env: dict[str, str], port: int, family: str, count: int, within: float, profile: Path | None = None
) -> dict[str, Any]:
    """Run ``blametrail command`` until its ``family`` counter reaches ``count``; rate from its first event.
    With ``profile`` (a directory), py-spy samples it meanwhile into ``profile/<command>.txt``."""
    url = f"http://127.0.0.1:{port}/metrics"
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    spy = None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        out = profile / f"{command}.txt"
        spy = subprocess.Popen(
            [py_spy, "record", "--nonblocking", "--format", "raw", "-o", str(out), "--pid", str(process.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + within
        first: tuple[float, float, float] | None = None
        done = 0.0
        while time.monotonic() < deadline and process.poll() is None:
            done = _counter(url, family)
            if first is None and done > 0:
                first = (time.monotonic(), done, cpu_seconds(process.pid))
            if done >= count:
                break
            time.sleep(0.1)
        if first is None or done < count:
            return {"events": done, "drained": False}
        took = time.monotonic() - first[0]
        return {**_rate(int(count - first[1]), took, cpu_seconds(process.pid) - first[2]), "drained": True}
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(30)
        process.terminate()
        process.wait(30)


def copy_ceiling(database_url: str, raw_topic: str) -> dict[str, float]:
    """``COPY`` of the audit rows the writer wrote for ``raw_topic`` into ``audit_records`` again: the
    same rows into the same table, with its indexes, constraints and WAL, committed. Each copy's
    delivery id is the SHA-256 of the original's, spread over the unique index as the writer's ids
    are (a common prefix put every copy in one corner of the index: 32-35k rows/s against 20-26k with
    spread ids, docs/benchmarks.md). The copies are deleted afterwards."""
    conninfo = as_libpq(database_url)
    columns = ", ".join(AUDIT_COLUMNS)
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(f"SELECT {columns} FROM audit_records WHERE raw_topic = %s", (raw_topic,)).fetchall()
        copies = [(hashlib.sha256(b"copy:" + str(row[0]).encode()).hexdigest(), *row[1:]) for row in rows]
        conn.commit()
        if not copies:
            return {"events": 0}
        started, cpu = time.monotonic(), _own_cpu()
        with conn.cursor() as cursor, cursor.copy(f"COPY audit_records ({columns}) FROM STDIN") as copy:
            for row in copies:
                copy.write_row(row)
        conn.commit()
        result = _rate(len(copies), time.monotonic() - started, _own_cpu() - cpu)
        conn.execute(
            "DELETE FROM audit_records WHERE raw_topic = %s AND delivery_id = ANY(%s)",
            (raw_topic, [row[0] for row in copies]),
        )
        conn.commit()
        return result


def run(run_dir: Path, count: int, within: float = 300.0, profile: Path | None = None) -> dict[str, Any]:
    env_file = {**read_env(run_dir / "postgres.env"), **read_env(run_dir / "kafka.env")}
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    settings = Settings(
        kafka_bootstrap=env_file["BLAMETRAIL_KAFKA_BOOTSTRAP"],
        database_url=env_file["BLAMETRAIL_DATABASE_URL"],
        topic_prefix=prefix,
        router_group=prefix + "router",
        writer_group=prefix + "writer",
        router_metrics_port=free_port(),
        writer_metrics_port=free_port(),
    )
    topics = Topics.from_settings(settings)
    values = mixed_bodies(count, project="payments-api")
    asyncio.run(create_topics(settings))
    asyncio.run(fill(settings, topics.raw, values))
    results: dict[str, Any] = {"events": count, "topic_prefix": prefix}
    results["passthrough"] = asyncio.run(passthrough(settings, topics.raw, topics.dlq, count))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLAMETRAIL_")}
    env.update({f"BLAMETRAIL_{k.upper()}": str(v) for k, v in settings.model_dump().items()})
    env["BLAMETRAIL_LOG_FORMAT"] = "json"
    results["router"] = service_drain(
        "router", env, settings.router_metrics_port, "blametrail_router_events", count, within, profile
    )
    results["writer"] = service_drain(
        "writer", env, settings.writer_metrics_port, "blametrail_writer_events", count, within, profile
    )
    results["copy"] = copy_ceiling(settings.database_url, topics.raw)
    for stage, ceiling in (("router", "passthrough"), ("writer", "copy")):
        # A drain of a few events can fit in one batch: no time between its first and last event.
        if results[stage].get("drained") and results[ceiling]["events_per_s"]:
            results[f"{stage}_vs_{ceiling}"] = round(
                results[stage]["events_per_s"] / results[ceiling]["events_per_s"], 3
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", type=Path, default=Path("/tmp/bt-bench"))
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--profile", type=Path, help="directory for py-spy profiles of router and writer")
    args = parser.parse_args()
    print(json.dumps(run(args.stack, args.events, profile=args.profile), indent=2))


if __name__ == "__main__":
    main()
