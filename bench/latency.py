"""Ack latency at a fixed rate (open loop), with CPU per webhook and peak memory of every process.

vegeta (``--engine vegeta``, the default when it is installed) or ``bench.openloop`` (``--engine
python``) sends ``rate * seconds`` pre-signed, distinct webhooks at exactly ``rate`` per second while
the whole pipeline runs. Reported: answers by status, p50/p99/p99.9/max of the answers, how many
took over 1 s (Sentry's budget) or got none. CPU: ``/proc/<pid>/stat`` of every known process from
the start of the run until the writer has written every acknowledged webhook (or a deadline), divided
by the acknowledged webhooks.

    python -m bench.latency --stack /tmp/bt-bench --rate 1000 --seconds 30
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families

from bench import openloop
from bench.harness import (
    CpuMeter,
    Target,
    find_vegeta,
    loopback_only,
    peak_rss_mb,
    per_webhook_ms,
    percentiles,
    read_bodies,
    wait_idle,
    write_bodies,
)
from bench.stack import SERVICES
from shared import metrics

BUDGET = 1.0  # Sentry's answer budget, seconds


def writer_events(url: str | None) -> float | None:
    """The writer's ``blametrail_writer_events_total``, all outcomes (None without a URL)."""
    if url is None:
        return None
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return None
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "blametrail_writer_events"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def wait_written(url: str | None, before: float | None, count: float, within: float) -> bool | None:
    """Whether the writer counted ``count`` more events than ``before`` within ``within`` seconds."""
    if url is None or before is None:
        return None
    deadline = time.monotonic() + within
    while True:
        if (writer_events(url) or 0.0) - before >= count:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _metric_name(metric: Histogram) -> str:
    (family,) = metric.describe()
    return family.name


REQUEST_HISTOGRAM = _metric_name(metrics.INGEST_REQUEST_SECONDS)
ACCEPT_HISTOGRAM = _metric_name(metrics.INGEST_ACCEPT_WAIT_SECONDS)


def server_histograms(base_url: str) -> dict[str, dict[float, float]]:
    """ingest's own request and accept-wait histograms: name -> upper bound -> cumulative count."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    found: dict[str, dict[float, float]] = {REQUEST_HISTOGRAM: {}, ACCEPT_HISTOGRAM: {}}
    for family in text_string_to_metric_families(text):
        if family.name in found:
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    found[family.name][float(sample.labels["le"])] = sample.value
    return found


def _delta(before: dict[float, float], after: dict[float, float]) -> tuple[dict[float, float], float]:
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in sorted(after)}
    return delta, delta.get(float("inf"), 0.0)


def _bound_ms(delta: dict[float, float], total: float, q: float) -> float:
    """Upper bucket bound (ms) holding the ``q`` quantile."""
    return next((le * 1000 for le, n in delta.items() if n >= q * total), float("inf"))


def server_view(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """Time inside ingest (first byte handled to answer) for the run: bucket bounds of p50/p99, and
    how many took over the budget there — the rest of a client's latency is queueing before ingest."""
    delta, total = _delta(before, after)
    return {
        "requests": total,
        "p50_le_ms": _bound_ms(delta, total, 0.5),
        "p99_le_ms": _bound_ms(delta, total, 0.99),
        "over_budget": total - delta.get(BUDGET, 0.0),
    }


def accept_view(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """The run's new connections and how long they waited in the kernel to be accepted (ingest's
    ``blametrail_ingest_accept_wait_seconds``): a wait no request histogram sees."""
    delta, total = _delta(before, after)
    return {
        "connections": total,
        "p99_le_ms": _bound_ms(delta, total, 0.99) if total else 0.0,
        "over_250ms": total - delta.get(0.25, 0.0),
        "over_budget": total - delta.get(BUDGET, 0.0),
    }


def _vegeta(
    vegeta: str, target: Target, file: Path, rate: int, seconds: float, tmp: Path, new_connections: bool = False
) -> list[openloop.Answer]:
    url = f"{loopback_only(target.url)}{target.webhook_path}"
    targets = tmp / "targets.jsonl"
    with targets.open("w") as out:
        for signature, body in read_bodies(file):
            header = {"Content-Type": ["application/json"], "Sentry-Hook-Resource": ["issue"]}
            header["Sentry-Hook-Signature"] = [signature]
            line = {"method": "POST", "url": url, "body": base64.b64encode(body).decode(), "header": header}
            out.write(json.dumps(line) + "\n")
    results = tmp / "results.bin"
    command = [vegeta, "attack", "-format=json", "-lazy", f"-targets={targets}", f"-rate={rate}/1s"]
    command += [f"-duration={seconds}s", "-timeout=5s", "-max-body=0", f"-output={results}"]
    if new_connections:
        command.append("-keepalive=false")
    subprocess.run(command, check=True, timeout=seconds + 60)
    encoded = subprocess.run([vegeta, "encode", "--to=csv", str(results)], check=True, capture_output=True, text=True)
    answers = []
    for row in csv.reader(io.StringIO(encoded.stdout)):
        answers.append(openloop.Answer(int(row[1]), int(row[2]) / 1e9, row[5]))
    return answers


def _python(target: Target, file: Path, rate: int, seconds: float) -> list[openloop.Answer]:
    parts = urlsplit(loopback_only(target.url))
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [openloop.request_bytes(host, port, target.webhook_path, s, b) for s, b in read_bodies(file)]
    return openloop.run(host, port, requests, rate, seconds)


def end_to_end(database_url: str | None, start: float, end: float) -> dict[str, float] | None:
    """Received → written of the run's webhooks: ``processed_at - received_at`` of the audit records
    received during the run (``processed_at`` is the writer transaction's start), in ms."""
    if not database_url:
        return None
    import psycopg

    query = """
        SELECT count(*),
               percentile_cont(ARRAY[0.5, 0.99, 0.999]) WITHIN GROUP (ORDER BY d),
               max(d)
        FROM (SELECT (extract(epoch FROM processed_at - received_at) * 1000)::float8 AS d
              FROM audit_records WHERE received_at >= to_timestamp(%s) AND received_at < to_timestamp(%s)) AS t
    """
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute(query, (start, end)).fetchone()
    if row is None or not row[0]:
        return None
    count, (p50, p99, p999), worst = row
    return {
        "records": count,
        "p50": round(p50, 1),
        "p99": round(p99, 1),
        "p99_9": round(p999, 1),
        "max": round(worst, 1),
    }


def run(
    target: Target,
    rate: int,
    seconds: float,
    *,
    engine: str = "auto",
    drain_within: float = 120.0,
    workdir: Path | None = None,
    first_body: int = 0,
    idle_within: float = 300.0,
    new_connections: bool = False,
) -> dict[str, Any]:
    """One open-loop run at ``rate``/s. ``first_body``: sequence number of the first body (keep runs distinct).

    Starts once router and writer have no lag (at most ``idle_within`` seconds; the result says
    whether they had none): a backlog left by an earlier run would be measured as this one's.
    ``new_connections``: every webhook on a connection of its own, as Sentry sends them (its
    ``safe_urlopen`` builds a session per webhook); vegeta only. Otherwise connections are kept alive."""
    vegeta = find_vegeta() if engine in ("auto", "vegeta") else None
    if engine == "vegeta" and vegeta is None:
        sys.exit("vegeta not found: go install github.com/tsenart/vegeta/v12@latest (or --engine python)")
    used_engine = "vegeta" if vegeta else "python"
    if new_connections and not vegeta:
        sys.exit("a connection per webhook needs vegeta (the Python generator keeps its connections)")
    count = int(rate * seconds) + rate
    before = wait_idle(target.kafka, idle_within)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        file = write_bodies(Path(tmp) / "bodies.tsv", target.secret, count, project=target.project, start=first_body)
        written_before = writer_events(target.writer_metrics)
        histograms_before = server_histograms(loopback_only(target.url))
        meter = CpuMeter(target.pids)
        started, wall_started = time.monotonic(), time.time()
        if vegeta:
            answers = _vegeta(vegeta, target, file, rate, seconds, Path(tmp), new_connections)
        else:
            answers = _python(target, file, rate, seconds)
        attack_seconds = time.monotonic() - started
        wall_ended = time.time()
    statuses = Counter(a.status for a in answers)
    acked = sum(n for status, n in statuses.items() if 200 <= status < 300)
    drained = wait_written(target.writer_metrics, written_before, acked, drain_within)
    used = meter.stop()
    histograms_after = server_histograms(loopback_only(target.url))
    answered = [a.latency for a in answers if a.status]
    return {
        "engine": used_engine,
        "new_connections": new_connections,
        "rate": rate,
        "seconds": seconds,
        "sent": len(answers),
        "achieved_rate": round(len(answers) / attack_seconds, 1) if attack_seconds else 0.0,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "acked": acked,
        **percentiles(answered),
        "over_budget": sum(1 for a in answers if a.status == 0 or a.latency > BUDGET),
        "errors": dict(Counter(a.error.split(": ")[-1][:80] for a in answers if a.error).most_common(3)),
        "over_budget_by_status": dict(Counter(str(a.status) for a in answers if a.status == 0 or a.latency > BUDGET)),
        "inside_ingest": server_view(histograms_before[REQUEST_HISTOGRAM], histograms_after[REQUEST_HISTOGRAM]),
        "accept_wait": accept_view(histograms_before[ACCEPT_HISTOGRAM], histograms_after[ACCEPT_HISTOGRAM]),
        "backlog_before": before,
        "pipeline_drained": drained,
        "end_to_end_ms": end_to_end(target.database_url, wall_started, wall_ended) if drained else None,
        "window_seconds": round(meter.wall, 2),
        "cpu_seconds": {k: round(v, 3) for k, v in used.items()},
        "cpu_ms_per_webhook": per_webhook_ms(used, acked, SERVICES),
        "peak_rss_mb": {name: peak_rss_mb(pid) for name, pid in target.pids.items()},
    }


def main() -> None:
    from bench.stack import add_target_arguments, target_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(parser)
    parser.add_argument("--rate", type=int, default=1000, help="webhooks per second (default 1000)")
    parser.add_argument("--engine", choices=("auto", "vegeta", "python"), default="auto")
    parser.add_argument("--first-body", type=int, default=int(time.time()) % 1_000_000 * 1000)
    parser.add_argument("--new-connections", action="store_true", help="a connection per webhook, as Sentry sends")
    parser.add_argument(
        "--warmup", type=float, default=0.0, help="seconds of unmeasured load at --rate first (a just-started stack)"
    )
    args = parser.parse_args()
    target = target_from_args(args)
    if args.warmup > 0:
        run(target, args.rate, args.warmup, engine=args.engine, first_body=args.first_body + 5 * 10**8)
    result = run(
        target,
        args.rate,
        args.seconds,
        engine=args.engine,
        first_body=args.first_body,
        new_connections=args.new_connections,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
