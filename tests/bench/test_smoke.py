"""The benchmark harness runs end to end at tiny sizes: not a benchmark, a check that it still works.

Ingest, router and writer as processes on the session's Kafka and Postgres (``running_stack``),
then ``bench.run_all.run`` for 1 s a measurement at 50 webhooks/s: wrk against the bare endpoint and
ingest, the open-loop run (vegeta when installed, else the Python generator; the Python generator is
run as well either way), CPU and memory from /proc. wrk is required (``apt-get install wrk``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bench import latency, run_all
from bench.harness import Target
from shared.db.conninfo import libpq_url
from shared.settings import Settings
from tests.support.stack import running_stack

LATENCY_KEYS = {"p50_ms", "p99_ms", "p999_ms", "max_ms", "over_budget", "cpu_ms_per_webhook", "peak_rss_mb", "acked"}


def check_latency(run: dict[str, Any], sent: int) -> None:
    assert LATENCY_KEYS <= set(run), run
    assert run["sent"] == sent and run["acked"] == sent, run
    assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["p999_ms"] <= run["max_ms"], run
    assert run["over_budget"] == 0, run
    assert run["accept_wait"]["connections"] >= 1 and run["accept_wait"]["over_budget"] == 0, run["accept_wait"]
    cpu = run["cpu_ms_per_webhook"]
    assert all(cpu[name] > 0 for name in ("ingest", "router", "writer", "services_total")), cpu
    assert all(run["peak_rss_mb"][name] > 0 for name in ("ingest", "router", "writer")), run["peak_rss_mb"]
    assert run["pipeline_drained"] is True, run
    assert run["backlog_before"]["idle"] is True, run["backlog_before"]
    e2e = run["end_to_end_ms"]
    assert e2e["records"] >= sent and 0 <= e2e["p50"] <= e2e["p99"] <= e2e["max"], e2e


def closed_connections(port: int) -> int:
    """Connections to ``port`` closed in the last minute: their TIME_WAIT entries in ``/proc/net/tcp``
    (on the side that closed first, or on both)."""
    suffix = f":{port:04X}"
    rows = [row.split() for row in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for row in rows if row[3] == "06" and (row[1].endswith(suffix) or row[2].endswith(suffix)))


async def test_run_all_produces_every_figure(topics: Settings, tmp_path: Path) -> None:
    async with running_stack(topics, tmp_path) as stack:
        settings = stack.settings
        target = Target(
            url=f"http://127.0.0.1:{settings.ingest_port}",
            org=stack.org,
            secret=stack.secret,
            project="payments-api",
            pids=dict(zip(("ingest", "router", "writer"), (p.proc.pid for p in stack.processes), strict=True)),
            writer_metrics=f"http://127.0.0.1:{settings.writer_metrics_port}/metrics",
            database_url=libpq_url(settings),
            kafka=settings,
        )
        results = await asyncio.to_thread(
            run_all.run, target, 1, [50], connections=8, engine="auto", saturation_bodies=500, warmup=1
        )
        python_run = new_connections_run = None
        if results["latency"]["50"]["engine"] != "python":
            python_run = await asyncio.to_thread(latency.run, target, 50, 1, engine="python", first_body=10**8)
            closed_before = closed_connections(settings.ingest_port)
            new_connections_run = await asyncio.to_thread(
                latency.run, target, 50, 1, engine="vegeta", first_body=2 * 10**8, new_connections=True
            )
            closed = closed_connections(settings.ingest_port) - closed_before

    assert {"machine", "saturation", "latency", "targets"} <= set(results)
    speed = results["machine"]["speed_probe_us"]
    assert set(speed) == {"start", "after_saturation", "after_latency_50"} and min(speed.values()) > 0, speed
    saturation = results["saturation"]
    for side in ("bare", "ingest"):
        assert saturation[side]["ok_per_s"] > 0 and saturation[side]["requests"] > 0, saturation
        assert saturation[side]["non2xx"] == 0 and saturation[side]["socket_errors"] == 0, saturation
    assert saturation["ratio"] > 0
    assert saturation["ingest"]["ingest_cpu_ms_per_request"] > 0
    assert saturation["backlog_drain"]["drained"] is True, saturation
    check_latency(results["latency"]["50"], 50)
    check_latency(results["warmup"], 50)  # the unmeasured warm-up's figures are kept too
    if python_run is not None:
        check_latency(python_run, 50)
    if new_connections_run is not None:  # vegeta: a connection per webhook
        check_latency(new_connections_run, 50)
        assert new_connections_run["new_connections"] is True and closed >= 50, closed
        assert new_connections_run["accept_wait"]["connections"] >= 50, new_connections_run["accept_wait"]
    # the others need the 1,000/s and 2,000/s runs, the drain runs and the mapping cache run
    assert set(results["targets"]) == {"ingest_vs_bare", "ingest_rss"}
