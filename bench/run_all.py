"""Every measurement of the performance issue in one run, each beside its ceiling, checked against its target.

    python -m bench.run_all --out bench/results.json                 # 60 s a measurement
    python -m bench.run_all --seconds 25 --out bench/results.json    # what docs/benchmarks.md shows

Runs against the local stack in ``--stack`` (default ``/tmp/bt-bench``): started with
``scripts/up.sh`` when it is not running, and then stopped with ``scripts/down.sh`` at the end
(``--keep-up`` leaves it). ``--fresh`` first stops that stack and deletes its data: every run then
measures the same empty database (each run adds a few hundred thousand audit records, and later runs
on a grown database are slower). Or ``--url/--org/--secret`` for an ingest started elsewhere.
Every latency run starts once router and writer have no lag. Before and after each measurement,
``bench.harness.speed_probe`` records how fast the machine was (µs of CPU for a fixed piece of work,
``machine.speed_probe_us``): this VM's speed drifts by 2x within seconds, and a figure is only
comparable with one measured at a similar speed. First, ``--warmup`` seconds (default 120) of
unmeasured load at the first rate (``warmup`` in the results): a broker just started spends its
first minutes compiling its hot paths, CPU that is not the pipeline's in steady state.

1. ``bench.saturation``: wrk at ``--connections`` against a bare Starlette endpoint, then ingest
   (router and writer paused); then how fast router + writer drain the backlog that left.
2. ``bench.latency`` at each of ``--rates`` (default 1000 and 2000/s), open loop, full pipeline:
   ack percentiles, answers over 1 s, CPU ms per webhook of every process, peak RSS. On kept-alive
   connections; ``--new-connections``: a connection per webhook, as Sentry sends them.
3. ``bench.consumers`` (with ``--stack``; ``--events 0`` skips it): router events/s draining a
   pre-filled raw topic against a consume → produce passthrough, writer events/s against ``COPY``.
4. ``bench.cache_scale`` (with ``--stack``; ``--cache-mappings 0`` skips it): in a scratch database,
   ``--cache-mappings`` mappings in ``--cache-orgs`` orgs (default 100,000 in 10,000, about 30 s):
   the mapping cache's load time and memory, a router's RSS once loaded, a mapping change → cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench import cache_scale, consumers, latency, saturation
from bench.harness import Target, speed_probe, wait_idle
from bench.stack import (
    add_target_arguments,
    read_env,
    stack_down,
    stack_reset,
    stack_target,
    stack_up,
    target_from_args,
)

DEFAULT_STACK = Path("/tmp/bt-bench")
# A freshly started broker's CPU per webhook at 1,000/s fell from 0.63 to 0.22 ms over its first
# six 15 s runs (about 3 minutes: the JVM compiling Kafka's hot paths), then held (docs/benchmarks.md).
WARMUP_SECONDS = 120.0
TARGETS = {
    "ingest_vs_bare": "ingest acks/s >= 0.45 x bare endpoint",
    "p99_at_1000": "ack p99 <= 50 ms at 1,000/s",
    "max_at_1000": "ack max <= 250 ms at 1,000/s",
    "none_over_1s_at_2000": "no answer over 1 s (or none) at 2,000/s",
    "cpu_per_webhook": "CPU <= 0.6 ms per webhook end to end (ingest + router + writer) at 1,000/s",
    "end_to_end_p99_at_1000": "received -> written p99 <= 100 ms at 1,000/s",
    "router_vs_passthrough": "router events/s >= 0.7 x consume -> produce passthrough",
    "writer_vs_copy": "writer events/s >= 0.2 x COPY of its audit rows",
    "ingest_rss": "ingest peak RSS <= 120 MB (after every latency run)",
    "router_rss_100k": "router RSS <= 250 MB with 100,000 mappings",
}


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def put(name: str, value: float | None, ok: bool | None) -> None:
        out[name] = {"target": TARGETS[name], "value": value, "met": ok}

    sat = results.get("saturation")
    if sat:
        put("ingest_vs_bare", sat["ratio"], sat["ratio"] >= 0.45)
    low = results.get("latency", {}).get("1000")
    if low:
        put("p99_at_1000", low["p99_ms"], low["p99_ms"] <= 50)
        put("max_at_1000", low["max_ms"], low["max_ms"] <= 250)
        cpu = low["cpu_ms_per_webhook"].get("services_total")
        put("cpu_per_webhook", cpu, None if cpu is None else cpu <= 0.6)
        e2e = (low.get("end_to_end_ms") or {}).get("p99")
        put("end_to_end_p99_at_1000", e2e, None if e2e is None else e2e <= 100)
    high = results.get("latency", {}).get("2000")
    if high:
        put("none_over_1s_at_2000", high["over_budget"], high["over_budget"] == 0)
    rss = [r.get("peak_rss_mb", {}).get("ingest") for r in results.get("latency", {}).values()]
    if rss and None not in rss:
        put("ingest_rss", max(rss), max(rss) <= 120)
    drained = results.get("consumers", {})
    for name, floor in (("router_vs_passthrough", 0.7), ("writer_vs_copy", 0.2)):
        if name in drained:
            put(name, drained[name], drained[name] >= floor)
    cache = results.get("cache_scale", {}).get("target")
    if cache:
        put("router_rss_100k", cache["rss_mb"], cache["met"])
    return out


def run(
    target: Target,
    seconds: float,
    rates: list[int],
    *,
    connections: int = 64,
    engine: str = "auto",
    saturation_bodies: int = 30_000,
    stack: Path | None = None,
    events: int = 0,
    cache_orgs: int = 0,
    cache_mappings: int = 0,
    new_connections: bool = False,
    warmup: float = 0.0,
) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "seconds": seconds, "command": " ".join(sys.argv)}
    first = int(time.time()) % 100_000 * 10_000
    if warmup > 0 and rates:
        # Unmeasured load first: a broker just started by up.sh spends its first minutes compiling
        # (C2), and that CPU would be counted as the pipeline's. Kept in the results to show it.
        results["warmup"] = latency.run(
            target, rates[0], warmup, engine=engine, first_body=first + 9 * 10**8, new_connections=new_connections
        )
    results["backlog_before"] = wait_idle(target.kafka, 300)
    pause = {k: v for k, v in target.pids.items() if k in ("router", "writer")}
    written_before = latency.writer_events(target.writer_metrics)
    acked_before = sum(v for k, v in saturation.outcomes(target.url).items() if k in ("accepted", "spooled"))
    speed = results["machine"]["speed_probe_us"] = {"start": speed_probe()}
    results["saturation"] = saturation.run(
        target, seconds, connections=connections, pause=pause, bodies=saturation_bodies
    )
    acked = sum(v for k, v in saturation.outcomes(target.url).items() if k in ("accepted", "spooled")) - acked_before
    started = time.monotonic()
    drained = latency.wait_written(target.writer_metrics, written_before, acked, within=300)
    if drained is not None:
        took = time.monotonic() - started
        results["saturation"]["backlog_drain"] = {
            "webhooks": int(acked),
            "drained": drained,
            "seconds": round(took, 2),
            "events_per_s": round(acked / took, 1) if took and drained else None,
        }
    speed["after_saturation"] = speed_probe()
    results["latency"] = {}
    for n, rate in enumerate(rates):
        results["latency"][str(rate)] = latency.run(
            target,
            rate,
            seconds,
            engine=engine,
            first_body=first + n * 10 * rate * int(seconds + 2),
            new_connections=new_connections,
        )
        speed[f"after_latency_{rate}"] = speed_probe()
    if stack is not None and events > 0:
        results["consumers"] = consumers.run(stack, events)
        speed["after_consumers"] = speed_probe()
    if stack is not None and cache_mappings > 0:
        env = {**read_env(stack / "postgres.env"), **read_env(stack / "kafka.env")}
        results["cache_scale"] = cache_scale.run(
            env["BLAMETRAIL_DATABASE_URL"], env["BLAMETRAIL_KAFKA_BOOTSTRAP"], max(cache_orgs, 1), cache_mappings
        )
    results["targets"] = verdicts(results)
    results["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(parser)
    parser.add_argument("--rates", default="1000,2000", help="open-loop rates, comma-separated")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections for saturation")
    parser.add_argument("--engine", choices=("auto", "vegeta", "python"), default="auto")
    parser.add_argument("--events", type=int, default=20_000, help="records for the router/writer drain runs")
    parser.add_argument("--cache-orgs", type=int, default=10_000, help="orgs for the mapping cache run")
    parser.add_argument("--cache-mappings", type=int, default=100_000, help="mappings for the mapping cache run")
    parser.add_argument("--keep-up", action="store_true", help="leave a stack this run started running")
    parser.add_argument("--fresh", action="store_true", help="delete the --stack's data first (a new database)")
    parser.add_argument(
        "--new-connections", action="store_true", help="latency runs: a connection per webhook, as Sentry sends"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=WARMUP_SECONDS,
        help=f"seconds of unmeasured load at the first rate before measuring (default {WARMUP_SECONDS:g})",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",") if r]
    started_stack = None
    if not args.url and args.stack is None:
        args.stack = DEFAULT_STACK
    if args.fresh:
        if args.stack is None:
            parser.error("--fresh needs --stack (it deletes that run directory's data)")
        stack_reset(args.stack)
    if args.stack is not None:
        try:
            stack_target(args.stack)
        except (SystemExit, OSError, KeyError, ValueError):
            print(f"starting the stack in {args.stack} (scripts/up.sh)", file=sys.stderr)
            stack_up(args.stack)
            started_stack = args.stack
    try:
        target = target_from_args(args)
        options = {"connections": args.connections, "engine": args.engine, "stack": args.stack, "events": args.events}
        options["new_connections"] = args.new_connections
        options["warmup"] = args.warmup
        cache = {"cache_orgs": args.cache_orgs, "cache_mappings": args.cache_mappings}
        results = run(target, args.seconds, rates, **options, **cache)
    finally:
        if started_stack is not None and not args.keep_up:
            stack_down(started_stack)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for verdict in results["targets"].values():
        mark = {True: "met", False: "MISSED", None: "n/a"}[verdict["met"]]
        print(f"{mark:7} {verdict['target']}: {verdict['value']}")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
