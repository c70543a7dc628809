"""The router's mapping cache at scale: load time and memory with ``--mappings`` mappings in ``--orgs`` orgs.

The router keeps the whole mappings table in memory (``router.cache.MappingCache``) and reloads it
on every NOTIFY, so its memory and its reload time grow with the table. In a scratch database of its
own (created in the cluster of ``--stack`` or ``--database-url``, migrated with the project's
Alembic setup, dropped at the end: a running stack is not disturbed), this seeds ``--orgs`` orgs with
one service each and ``--mappings`` mappings spread over them (set-based ``INSERT … SELECT``, the
tables' constraints kept), then measures:

- **in_process**: ``MappingCache.load`` in this process: seconds (best of ``--loads``), and the
  memory the loaded cache holds and the peak during the load (tracemalloc, in a load of its own:
  tracing slows it down);
- **router**: a real ``blametrail router`` on that database (and on Kafka topics of its own, a
  ``bench-cache-<id>.`` prefix, deleted at the end): first on the empty database (its baseline RSS),
  then on the seeded one: seconds from its start until its ``blametrail_router_mapping_cache_entries``
  reports every mapping, and its RSS (``VmRSS``, peak ``VmHWM``) once loaded and settled;
- **change**: ``--changes`` times, an ``UPDATE`` of one mapping committed, until the router's
  ``blametrail_router_mapping_cache_refreshes_total{trigger="notify"}`` counts the reload it caused
  (the counter moves only once the new mappings are in place).

    python -m bench.cache_scale --stack /tmp/bt-bench --orgs 10000 --mappings 100000
    python -m bench.cache_scale --database-url postgresql+psycopg://... --kafka-bootstrap 127.0.0.1:9092
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from bench.saturation import free_port
from bench.stack import read_env
from router.cache import MappingCache
from shared.db.conninfo import as_libpq, libpq_url
from shared.db.migrate import upgrade
from shared.db.session import create_engine, sessionmaker
from shared.kafka import create_topics
from shared.settings import Settings
from shared.topics import Topics

TARGET_RSS_MB = 250.0  # the target: router RSS with 100,000 mappings
ENTRIES = "blametrail_router_mapping_cache_entries"
REFRESHES = "blametrail_router_mapping_cache_refreshes_total"
REFRESH_SECONDS = "blametrail_router_mapping_cache_refresh_seconds"


# Scratch database ----------------------------------------------------------------------------------


def _with_database(database_url: str, name: str) -> str:
    """``database_url`` pointing at database ``name`` of the same cluster."""
    base, _, query = database_url.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


@contextmanager
def scratch_database(database_url: str) -> Iterator[str]:
    """A new, empty database in ``database_url``'s cluster (its URL), dropped afterwards."""
    name = f"bench_cache_{uuid.uuid4().hex[:10]}"
    admin_url = as_libpq(_with_database(database_url, "postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_database(database_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def seed(database_url: str, orgs: int, mappings: int) -> float:
    """``orgs`` orgs with one service each and ``mappings`` mappings dealt round-robin over them.

    Mapping ``g`` of org ``g % orgs``: slug ``project-<g>``; Sentry's project id known for 4 in 5;
    1 in 10 inactive; 1 in 50 renamed in Sentry. Returns the seconds it took."""
    started = time.perf_counter()
    with psycopg.connect(as_libpq(database_url)) as conn:
        conn.execute(
            "INSERT INTO organizations (slug, name)"
            " SELECT 'bench-org-' || g, 'Bench org ' || g FROM generate_series(0, %s - 1) AS g",
            (orgs,),
        )
        conn.execute("INSERT INTO services (org_id, name) SELECT id, 'Service' FROM organizations")
        conn.execute(
            """
            INSERT INTO sentry_project_mappings
                (org_id, service_id, sentry_project_slug, active, sentry_project_id, renamed_to)
            SELECT s.org_id, s.id, 'project-' || g, g %% 10 <> 0,
                   CASE WHEN g %% 5 <> 0 THEN (4500000000 + g)::text END,
                   CASE WHEN g %% 50 = 0 THEN 'renamed-' || g END
            FROM generate_series(0, %s - 1) AS g
            JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS n FROM organizations) AS o
                ON o.n = g %% %s
            JOIN services AS s ON s.org_id = o.id
            """,
            (mappings, orgs),
        )
        conn.execute("ANALYZE")
    return round(time.perf_counter() - started, 2)


# In process ----------------------------------------------------------------------------------------


def _rss_mb(pid: int | str = "self") -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def _entries() -> float:
    return REGISTRY.get_sample_value(ENTRIES) or 0.0


async def in_process(database_url: str, loads: int) -> dict[str, Any]:
    """``MappingCache.load`` here: best and every time of ``loads`` loads, then memory under tracemalloc."""
    settings = Settings(database_url=database_url)
    engine = create_engine(settings, pool_size=2)
    sessions = sessionmaker(engine)
    try:
        times = []
        rss_before = _rss_mb()["VmRSS"]
        for _ in range(loads):
            cache = MappingCache(sessions, libpq_url(settings), refresh_seconds=3600)
            started = time.perf_counter()
            await cache.load("bench")
            times.append(round(time.perf_counter() - started, 3))
        rss_loaded = _rss_mb()["VmRSS"]
        entries = _entries()
        del cache
        gc.collect()
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            cache = MappingCache(sessions, libpq_url(settings), refresh_seconds=3600)
            await cache.load("bench")
            held, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        del cache
    finally:
        await engine.dispose()
    return {
        "entries": int(entries),
        "load_seconds": min(times),
        "load_seconds_all": times,
        "held_mb": round((held - before) / 2**20, 1),  # what the loaded cache keeps
        "peak_mb": round((peak - before) / 2**20, 1),  # the most allocated at once during a load
        "rss_growth_mb": round(rss_loaded - rss_before, 1),  # includes allocator slack and freed pools
    }


# The router process --------------------------------------------------------------------------------


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return None
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _refreshes(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], trigger: str) -> float:
    return samples.get((REFRESHES, (("trigger", trigger),)), 0.0)


class RouterProcess:
    """``blametrail router`` on ``settings``, read through its ``/metrics`` and ``/proc``."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{settings.router_metrics_port}/metrics"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLAMETRAIL_")}
        env.update({f"BLAMETRAIL_{k.upper()}": str(v) for k, v in settings.model_dump().items()})
        self._log = log_path.open("wb")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli", "router"], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait(
        self, ready: Any, within: float, what: str, every: float = 0.05
    ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Poll ``/metrics`` every ``every`` s until ``ready(samples)``; exits if the router dies or at ``within``."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(
                    f"the router exited ({self.process.returncode}) waiting for {what}: see {self._log.name}"
                )
            samples = _samples(self.url)
            if samples is not None and ready(samples):
                return samples
            time.sleep(every)
        raise SystemExit(f"the router did not report {what} within {within:.0f} s")

    def memory(self) -> dict[str, float]:
        return _rss_mb(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def _loaded(count: int) -> Any:
    """Loaded and settled: the start load has every mapping, and the reload the LISTEN connection
    asks for once it is up (``trigger="notify"``) is done too."""
    return lambda s: s.get((ENTRIES, ())) == count and _refreshes(s, "start") >= 1 and _refreshes(s, "notify") >= 1


def router_baseline(settings: Settings, log_dir: Path, within: float) -> dict[str, float]:
    """The router's RSS on an empty mappings table."""
    router = RouterProcess(settings, log_dir / "router-baseline.log")
    try:
        router.wait(_loaded(0), within, "an empty cache")
        return {"rss_mb": router.memory()["VmRSS"], "hwm_mb": router.memory()["VmHWM"]}
    finally:
        router.stop()


def router_loaded(settings: Settings, mappings: int, changes: int, log_dir: Path, within: float) -> dict[str, Any]:
    """Start → every mapping in the router's cache; its memory; then ``changes`` mapping updates."""
    router = RouterProcess(settings, log_dir / "router.log")
    try:
        router.wait(lambda s: s.get((ENTRIES, ())) == mappings, within, f"{mappings} cache entries")
        loaded_after = time.monotonic() - router.started
        samples = router.wait(_loaded(mappings), within, "the cache settled")
        memory = router.memory()
        out: dict[str, Any] = {
            "entries": int(samples.get((ENTRIES, ()), 0)),
            "start_to_loaded_seconds": round(loaded_after, 2),
            "rss_mb": memory["VmRSS"],
            "hwm_mb": memory["VmHWM"],
        }
        latencies = [_one_change(router, settings, n, within) for n in range(changes)]
        samples = router.wait(lambda s: True, within, "metrics")
        count = samples.get((REFRESH_SECONDS + "_count", ()), 0.0)
        total = samples.get((REFRESH_SECONDS + "_sum", ()), 0.0)
        out["reload_seconds_mean"] = round(total / count, 3) if count else None
        out["hwm_after_changes_mb"] = router.memory()["VmHWM"]
        if latencies:
            out["change_to_cache_ms"] = {
                "changes": len(latencies),
                "p50": round(statistics.median(latencies) * 1000, 1),
                "max": round(max(latencies) * 1000, 1),
            }
        return out
    finally:
        router.stop()


def _one_change(router: RouterProcess, settings: Settings, n: int, within: float) -> float:
    """An UPDATE of mapping ``project-0`` committed → the router's notify-triggered reload done (seconds)."""
    before = _refreshes(router.wait(lambda s: True, within, "metrics"), "notify")
    with psycopg.connect(libpq_url(settings), autocommit=True) as conn:
        conn.execute(
            "UPDATE sentry_project_mappings SET active = %s WHERE sentry_project_slug = 'project-0'", (n % 2 == 1,)
        )
        committed = time.monotonic()
    router.wait(lambda s: _refreshes(s, "notify") > before, within, "the reload after an update", every=0.005)
    return time.monotonic() - committed


async def _delete_topics(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="bench-cache")
    await admin.start()
    try:
        await admin.delete_topics(list(Topics.from_settings(settings).all()))
    finally:
        await admin.close()


# The run -------------------------------------------------------------------------------------------


def run(
    database_url: str,
    kafka_bootstrap: str | None,
    orgs: int,
    mappings: int,
    *,
    loads: int = 3,
    changes: int = 5,
    log_dir: Path | None = None,
    within: float = 600.0,
) -> dict[str, Any]:
    """Every figure of this module as one JSON-able dict; without ``kafka_bootstrap``, in process only."""
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="bench-cache-"))
    results: dict[str, Any] = {"orgs": orgs, "mappings": mappings}
    with scratch_database(database_url) as scratch:
        results["database"] = scratch.rpartition("/")[2]
        prefix = f"bench-cache-{uuid.uuid4().hex[:8]}."
        settings = Settings(
            database_url=scratch,
            kafka_bootstrap=kafka_bootstrap or Settings().kafka_bootstrap,
            topic_prefix=prefix,
            router_group=prefix + "router",
            router_metrics_port=free_port(),
            log_format="json",
        )
        upgrade(settings)
        if kafka_bootstrap:
            asyncio.run(create_topics(settings, partitions=1))
            results["topic_prefix"] = prefix
        try:
            if kafka_bootstrap:
                results["router_empty"] = router_baseline(settings, log_dir, within)
            results["seed_seconds"] = seed(scratch, orgs, mappings)
            results["in_process"] = asyncio.run(in_process(scratch, loads))
            if kafka_bootstrap:
                results["router"] = router_loaded(settings, mappings, changes, log_dir, within)
                rss = results["router"]["rss_mb"]
                results["target"] = {
                    "router_rss_mb_max": TARGET_RSS_MB,
                    "rss_mb": rss,
                    "met": rss <= TARGET_RSS_MB if mappings >= 100_000 else None,  # only at the target's size
                }
        finally:
            if kafka_bootstrap:
                asyncio.run(_delete_topics(settings))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orgs", type=int, default=10_000)
    parser.add_argument("--mappings", type=int, default=100_000, help="mappings in all (spread over the orgs)")
    parser.add_argument("--stack", type=Path, help="run directory of scripts/up.sh or scripts/postgres.sh + kafka.sh")
    parser.add_argument("--database-url", help="any database of the cluster to use (default $BLAMETRAIL_DATABASE_URL)")
    parser.add_argument("--kafka-bootstrap", help="Kafka for the router process (default $BLAMETRAIL_KAFKA_BOOTSTRAP)")
    parser.add_argument("--no-router", action="store_true", help="measure in process only (no Kafka needed)")
    parser.add_argument("--loads", type=int, default=3, help="in-process loads to time (the best is reported)")
    parser.add_argument("--changes", type=int, default=5, help="mapping updates to time through the router")
    args = parser.parse_args()
    database_url, kafka = args.database_url, args.kafka_bootstrap
    if args.stack:
        env = {**read_env(args.stack / "postgres.env"), **read_env(args.stack / "kafka.env")}
        database_url = database_url or env["BLAMETRAIL_DATABASE_URL"]
        kafka = kafka or env.get("BLAMETRAIL_KAFKA_BOOTSTRAP")
    database_url = database_url or os.environ.get("BLAMETRAIL_DATABASE_URL")
    kafka = kafka or os.environ.get("BLAMETRAIL_KAFKA_BOOTSTRAP")
    if not database_url:
        raise SystemExit("give --stack DIR or --database-url (or set BLAMETRAIL_DATABASE_URL)")
    if not kafka and not args.no_router:
        raise SystemExit("give --kafka-bootstrap (or --stack, or $BLAMETRAIL_KAFKA_BOOTSTRAP), or --no-router")
    kafka = None if args.no_router else kafka
    results = run(database_url, kafka, args.orgs, args.mappings, loads=args.loads, changes=args.changes)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
