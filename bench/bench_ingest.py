"""Load a running ingest with signed Sentry webhooks and report latency percentiles and throughput.

Starts nothing: point it at an ingest you started (see docs/ingest.md, "Benchmark"). Loopback only.

    python -m bench.bench_ingest --url http://127.0.0.1:8000 --org bench --secret "$SECRET" -n 20000 -c 50

Every request carries a distinct body (issue id and a counter vary), so every one is a new delivery;
bodies and signatures are prepared before the clock starts. Answers other than 200 are counted, not
retried. The answer's ``status`` (``accepted`` = Kafka acknowledged, ``spooled`` = local spool) is
counted too, so a run against a stopped broker measures the spool path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import loopback_only
from shared.security import sign

DEFAULT_PAYLOAD = Path(__file__).resolve().parents[2] / "shared" / "sentry" / "payloads" / "issue.created.json"
MAX_REQUESTS = 1_000_000
MAX_CONCURRENCY = 1000
Histogram = dict[float, float]  # bucket upper bound (seconds) -> cumulative count
SERVER_HISTOGRAMS = ("blametrail_ingest_request_seconds", "blametrail_ingest_publish_seconds")


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    duration: float = 0.0
    server: dict[str, Histogram] = field(default_factory=dict)


def bodies(template: dict[str, object], count: int, issues: int) -> list[bytes]:
    """``count`` distinct compact-JSON bodies spread over ``issues`` issue ids (partition keys)."""
    out: list[bytes] = []
    data = template.get("data")
    issue = data.get("issue") if isinstance(data, dict) else None
    if not isinstance(issue, dict):
        issue = {}
        template["data"] = {"issue": issue}
    for n in range(count):
        issue["id"] = str(9_000_000 + n % issues)
        template["bench_sequence"] = n
        out.append(json.dumps(template, separators=(",", ":")).encode())
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def prepare(args: argparse.Namespace) -> list[tuple[bytes, str]]:
    """Every request's body and signature, warm-up first."""
    template = json.loads(Path(args.payload).read_bytes())
    if not isinstance(template, dict):
        sys.exit(f"{args.payload}: the payload template must be a JSON object")
    return [(b, sign(args.secret, b)) for b in bodies(template, args.warmup + args.requests, args.issues)]


async def run(args: argparse.Namespace, prepared: list[tuple[bytes, str]]) -> Results:
    """Send ``prepared`` with ``args.concurrency`` workers; only requests after the warm-up are measured."""
    url = f"{loopback_only(args.url)}/webhooks/sentry/{args.org}"
    total = len(prepared)
    results = Results()
    # One single-connection client per worker: httpx's shared pool degrades with many connections
    # and would measure itself rather than ingest.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(limits=limits, timeout=args.timeout) for _ in range(args.concurrency)]
    next_index = 0
    try:

        async def worker(client: httpx.AsyncClient, until: int, measure: bool) -> None:
            nonlocal next_index
            while next_index < until:
                body, signature = prepared[next_index]
                next_index += 1
                headers = {
                    "Content-Type": "application/json",
                    "Sentry-Hook-Resource": args.resource,
                    "Sentry-Hook-Signature": signature,
                    "Sentry-Hook-Timestamp": str(int(time.time())),
                }
                started = time.perf_counter()
                try:
                    response = await client.post(url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    if measure:
                        results.errors[type(exc).__name__] += 1
                    continue
                elapsed = time.perf_counter() - started
                if not measure:
                    continue
                results.latencies.append(elapsed)
                results.statuses[response.status_code] += 1
                if response.status_code == 200:
                    results.outcomes[str(response.json().get("status"))] += 1

        await asyncio.gather(*(worker(c, args.warmup, False) for c in clients))
        before = await server_histograms(clients[0], args.url)
        started = time.perf_counter()
        await asyncio.gather(*(worker(c, total, True) for c in clients))
        results.duration = time.perf_counter() - started
        after = await server_histograms(clients[0], args.url)
        results.server = {name: delta(after[name], before.get(name, {})) for name in after}
    finally:
        for client in clients:
            await client.aclose()
    return results


async def server_histograms(client: httpx.AsyncClient, base: str) -> dict[str, Histogram]:
    """Ingest's request and publish latency histograms from its /metrics (empty if unreachable)."""
    try:
        text = (await client.get(f"{base.rstrip('/')}/metrics")).text
    except httpx.HTTPError:
        return {}
    out: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in SERVER_HISTOGRAMS:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                out.setdefault(family.name, {})[float(sample.labels["le"])] = sample.value
    return out


def delta(after: Histogram, before: Histogram) -> Histogram:
    return {le: count - before.get(le, 0.0) for le, count in after.items()}


def bucket_percentile(histogram: Histogram, q: float) -> float:
    """Upper bound (ms) of the bucket holding quantile ``q``: the server-side view, no client overhead."""
    total = histogram.get(float("inf"), 0.0)
    if not total:
        return float("nan")
    for le in sorted(histogram):
        if histogram[le] >= q * total:
            return le * 1000
    return float("inf")


def server_summary(server: dict[str, Histogram]) -> dict[str, float]:
    """p50/p99 of ingest's own histograms, as bucket upper bounds: ``server_request_p99_ms_le`` etc."""
    out: dict[str, float] = {}
    for name, histogram in server.items():
        short = name.removeprefix("blametrail_ingest_").removesuffix("_seconds")
        for q in (50, 99):
            out[f"server_{short}_p{q}_ms_le"] = bucket_percentile(histogram, q / 100)
    return out


def report(args: argparse.Namespace, results: Results, duration: float) -> dict[str, object]:
    ms = sorted(x * 1000 for x in results.latencies)
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "seconds": round(duration, 3),
        "throughput_per_s": round(len(ms) / duration, 1) if duration else 0.0,
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p95_ms": round(percentile(ms, 0.95), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(ms[-1], 2) if ms else float("nan"),
        "mean_ms": round(statistics.fmean(ms), 2) if ms else float("nan"),
        **server_summary(results.server),
        "statuses": dict(results.statuses),
        "outcomes": dict(results.outcomes),
        "errors": dict(results.errors),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="ingest base URL (loopback only)")
    parser.add_argument("--org", required=True, help="organization slug")
    parser.add_argument("--secret", required=True, help="the org's client secret")
    parser.add_argument("-n", "--requests", type=int, default=10_000, help="measured requests")
    parser.add_argument("-c", "--concurrency", type=int, default=50, help="requests in flight")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    parser.add_argument("--issues", type=int, default=1000, help="distinct issue ids (partition keys)")
    parser.add_argument("--resource", default="issue", help="Sentry-Hook-Resource")
    parser.add_argument("--payload", default=str(DEFAULT_PAYLOAD), help="JSON body template")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be 1..{MAX_REQUESTS}")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--concurrency must be 1..{MAX_CONCURRENCY}")
    if not 0 <= args.warmup <= MAX_REQUESTS or args.issues < 1:
        parser.error("--warmup must be 0..1000000 and --issues at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepared = prepare(args)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        results = asyncio.run(run(args, prepared))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = runner.run(run(args, prepared))
    summary = report(args, results, results.duration)
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>17}: {value}")
    return 0 if set(results.statuses) <= {200} and not results.errors else 1


if __name__ == "__main__":
    sys.exit(main())
