"""What every measurement of ``bench.run_all`` shares: the target, signed bodies, tools, process stats.

A *target* is a running ingest (URL, org, the org's client secret) plus the pids of the processes to
account CPU and memory to (ingest, router, writer, kafka, postgres: whichever are known). Bodies are
the corpus's ``issue.created`` with a distinct issue id and sequence number each and its times set
to now, signed with the org's secret before any clock starts, written one ``signature<TAB>body`` a
line for wrk's Lua script and the open-loop generators. The consumers' benchmark fills its topic
with :func:`mixed_bodies` (mixed resources, 80 % mapped).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from shared import events
from shared.security import sign
from shared.sentry import parse_webhook, raw_record_key
from shared.settings import Settings
from shared.topics import Topics

REPO = Path(__file__).resolve().parents[1]
PAYLOADS = Path(os.environ.get("BLAMETRAIL_PAYLOADS_DIR") or REPO.parent / "shared" / "sentry" / "payloads")
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Target:
    url: str  # ingest's base URL, loopback only
    org: str
    secret: str
    project: str = "payments-api"  # a mapped project of the org, so webhooks are routed and written
    pids: dict[str, int] = field(default_factory=dict)  # process name -> pid (its children counted too)
    writer_metrics: str | None = None  # the writer's /metrics URL: wait for the pipeline to drain
    database_url: str | None = None  # libpq URL of the stack's database: end-to-end latency from audit records
    # the stack's Kafka, topics and groups: runs wait for router and writer to have no lag
    kafka: Settings | None = None

    @property
    def webhook_path(self) -> str:
        return f"/webhooks/sentry/{self.org}"


def loopback_only(url: str) -> str:
    """``url`` without a trailing slash if its host is loopback; exits otherwise."""
    host = urlsplit(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"refusing {url}: the benchmarks only talk to loopback addresses")
    return url.rstrip("/")


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# The router's mix (the issue's "mixed resources, 80 % mapped"): resource, corpus file, the file's
# project slug, issue id and timestamps (replaced per body), and its weight out of 10.
MIX = (
    ("issue", "issue.created.json", 5),
    ("error", "error.created.json", 2),
    ("event_alert", "event_alert.triggered.json", 2),
    ("metric_alert", "metric_alert.resolved.json", 1),
)
UNMAPPED = "bench-unmapped"  # a project slug no mapping names: ignored as ``unmapped``
_TIMESTAMP = re.compile(rb'"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z"')


def mixed_bodies(count: int, *, project: str, issues: int = 1000, unmapped_every: int = 5) -> list[tuple[str, bytes]]:
    """``count`` distinct ``(resource, body)`` pairs in the :data:`MIX` proportions, over ``issues``
    issue ids; every ``unmapped_every``-th names :data:`UNMAPPED` instead of ``project``. Every
    timestamp in a body is now (the corpus's are from 2019-2020: outside the router's event-time
    window, every event would take the boundary check's rewrite path, which live traffic does not)."""
    now = json.dumps(_now_text()).encode()
    templates = []
    for resource, name, weight in MIX:
        document = json.loads((PAYLOADS / name).read_bytes())
        parsed = parse_webhook(resource, document)
        slug = parsed.projects[0].slug if parsed.projects else None
        compact = _TIMESTAMP.sub(now, json.dumps(document, separators=(",", ":")).encode())
        templates += [(resource, compact, slug, parsed.sentry_issue_id)] * weight
    out = []
    for n in range(count):
        resource, body, slug, issue = templates[n % len(templates)]
        unmapped = (n // len(templates)) % unmapped_every == unmapped_every - 1  # every resource alike
        if slug:  # wherever the parser finds it: a field, a list, an API URL
            body = body.replace(slug.encode(), (UNMAPPED if unmapped else project).encode())
        if issue:
            body = body.replace(issue.encode(), str(9_000_000 + n % issues).encode())
        out.append((resource, body[:-1] + b',"bench_sequence":%d}' % n))
    return out


def as_ingest_writes(org: str, resource: str, body: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The raw record's key and headers for ``body``, as ingest writes them (received now)."""
    headers = [
        (events.H_ORG, org.encode()),
        (events.H_RESOURCE, resource.encode()),
        (events.H_RECEIVED_AT, events.rfc3339(events.utc_now()).encode()),
        (events.H_DELIVERY_ID, events.delivery_id(org, resource, body).encode()),
        (events.H_INGEST_VERSION, b"1"),
    ]
    return raw_record_key(org, resource, json.loads(body)).encode(), headers


def write_bodies(path: Path, secret: str, count: int, *, project: str, issues: int = 1000, start: int = 0) -> Path:
    """``count`` distinct signed ``issue.created`` bodies over ``issues`` issue ids, one a line; their
    times are now (see :func:`mixed_bodies`)."""
    template = json.loads((PAYLOADS / "issue.created.json").read_bytes())
    issue = template["data"]["issue"]
    if isinstance(issue.get("project"), dict):
        issue["project"]["slug"] = project
    issue["firstSeen"] = issue["lastSeen"] = _now_text()
    lines = []
    for n in range(start, start + count):
        issue["id"] = str(9_000_000 + n % issues)
        template["bench_sequence"] = n
        body = json.dumps(template, separators=(",", ":"))
        lines.append(f"{sign(secret, body.encode())}\t{body}\n")
    path.write_text("".join(lines))
    return path


def read_bodies(path: Path) -> list[tuple[str, bytes]]:
    out = []
    for line in path.read_bytes().splitlines():
        signature, _, body = line.partition(b"\t")
        out.append((signature.decode(), body))
    return out


def percentiles(latencies: Iterable[float]) -> dict[str, float]:
    """p50, p99, p99.9 and max of ``latencies`` (seconds), in milliseconds (nearest rank)."""
    values = sorted(latencies)
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "p999_ms": 0.0, "max_ms": 0.0}

    def at(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "p999_ms": at(0.999), "max_ms": round(values[-1] * 1000, 2)}


# Tools ---------------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """The ``wrk`` binary, installed with apt-get (Debian package ``wrk``) when missing."""
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found: apt-get install -y wrk", file=sys.stderr)
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    install = [*sudo, "apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, capture_output=True).returncode != 0:
        subprocess.run([*sudo, "apt-get", "update", "-q"], capture_output=True)
        subprocess.run(install, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        sys.exit("wrk is missing and apt-get could not install it: apt-get install wrk")
    return found


def find_vegeta(install: bool = False) -> str | None:
    """``vegeta`` on PATH or in Go's bin directory; with ``install``, ``go install`` it when missing."""
    gobin = Path(os.environ.get("GOBIN") or Path(os.environ.get("GOPATH") or Path.home() / "go") / "bin")
    candidates = [shutil.which("vegeta"), str(gobin / "vegeta")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if install and go:
        print("vegeta not found: go install github.com/tsenart/vegeta/v12@latest", file=sys.stderr)
        subprocess.run([go, "install", "github.com/tsenart/vegeta/v12@latest"], capture_output=True, timeout=600)
        if (gobin / "vegeta").is_file():
            return str(gobin / "vegeta")
    return None


# Processes -----------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on; the name may hold spaces


def children(pid: int) -> list[int]:
    """``pid`` and every live descendant (postgres backends, uvicorn workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live descendants, plus what its dead children used."""
    total = 0
    for member in children(pid):
        fields = _stat(member)
        if fields:  # utime, stime, cutime, cstime are fields 14-17 (index 11-14 from field 3)
            total += sum(int(v) for v in fields[11:15])
    return total / TICKS


def peak_rss_mb(pid: int) -> float:
    """Peak resident set (VmHWM) of ``pid`` plus its descendants' (an upper bound for postgres)."""
    total_kb = 0
    for member in children(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
        except OSError:
            pass
    return round(total_kb / 1024, 1)


class CpuMeter:
    """CPU seconds each named process used between ``__init__`` and ``stop``."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.started = time.monotonic()
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.wall = time.monotonic() - self.started
        return {name: cpu_seconds(pid) - self._before[name] for name, pid in self.pids.items()}


def per_webhook_ms(used: Mapping[str, float], webhooks: int, ours: Iterable[str]) -> dict[str, float]:
    """CPU milliseconds per webhook for each process, and the sums over ``ours`` and over all."""
    if webhooks <= 0:
        return {}
    out = {name: round(seconds * 1000 / webhooks, 3) for name, seconds in used.items()}
    mine = [name for name in ours if name in out]
    out["services_total"] = round(sum(out[name] for name in mine), 3)
    out["all_total"] = round(sum(v for k, v in out.items() if k != "services_total"), 3)
    return out


async def group_lag(bootstrap: str, group: str, topics: list[str]) -> int | None:
    """Records of ``topics`` that ``group`` has not committed yet (None while Kafka cannot tell)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="blametrail-bench")
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, client_id="blametrail-bench")
    try:
        await admin.start()
        await consumer.start()
        described = await admin.describe_topics(topics)
        committed = await admin.list_consumer_group_offsets(group)
        partitions = [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]
        ends = await consumer.end_offsets(partitions)
    except KafkaError:
        return None
    finally:
        await consumer.stop()
        await admin.close()
    if {tp.topic for tp in partitions} != set(topics):
        return None
    return sum(int(end) - max(0, committed[tp].offset if tp in committed else 0) for tp, end in ends.items())


def pipeline_lag(kafka: Settings) -> dict[str, int | None]:
    """The router's lag on the raw topic and the writer's on routed + ignored."""
    topics = Topics.from_settings(kafka)

    async def both() -> dict[str, int | None]:
        return {
            "router": await group_lag(kafka.kafka_bootstrap, kafka.router_group, [topics.raw]),
            "writer": await group_lag(kafka.kafka_bootstrap, kafka.writer_group, [topics.routed, topics.ignored]),
        }

    return asyncio.run(both())


def wait_idle(kafka: Settings | None, within: float) -> dict[str, Any]:
    """Wait until router and writer have committed everything in their topics (a backlog left by an
    earlier run, or by a restart during one, would be measured as this run's latency and CPU).
    Returns the lag found first, the lag at the end and how long it took; ``idle`` False past ``within``."""
    if kafka is None:
        return {"idle": None}
    started = time.monotonic()
    first = last = pipeline_lag(kafka)
    while not all(v == 0 for v in last.values()) and time.monotonic() - started < within:
        time.sleep(1.0)
        last = pipeline_lag(kafka)
    idle = all(v == 0 for v in last.values())
    return {"idle": idle, "lag_found": first, "lag_left": last, "waited_s": round(time.monotonic() - started, 1)}


_REFERENCE_BODY = json.dumps({"id": "1", "title": "x" * 200, "tags": [["level", "error"]] * 20}).encode()


def reference(events: int) -> None:
    """A fixed amount of CPU work per event (JSON in and out, a dict, a short loop). This VM's speed
    drifts by 2x within seconds (the same orjson loop took 3.0 to 8.0 µs an iteration): CPU measured
    beside this one's, or this one's measured before and after a run, says how fast the machine was."""
    for _ in range(events):
        document = orjson.loads(_REFERENCE_BODY)
        document["seen"] = sum(range(50))
        orjson.dumps(document)


def speed_probe(events: int = 20_000) -> float:
    """Microseconds of CPU an event of :func:`reference` right now (lower is faster), the least of
    three short runs: run it while the machine is otherwise idle, before and after a measurement."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        reference(events)
        best = min(best, time.process_time() - started)
    return round(best * 1e6 / events, 2)
