"""``bench.cache_scale`` end to end at a tiny size: not a benchmark, a check that it still works.

A scratch database in the session's Postgres cluster (dropped afterwards), 20 orgs and 200 mappings,
the in-process load, a real ``blametrail router`` on the session's Kafka (on an empty table, then on
the seeded one) and two mapping updates timed through its metrics.
"""

from __future__ import annotations

from pathlib import Path

import psycopg

from bench import cache_scale
from shared.db.conninfo import libpq_url
from shared.settings import Settings


def test_cache_scale_measures_a_router_that_loaded_every_mapping(migrated: Settings, tmp_path: Path) -> None:
    results = cache_scale.run(
        migrated.database_url, migrated.kafka_bootstrap, orgs=20, mappings=200, loads=2, changes=2, log_dir=tmp_path
    )

    assert (results["orgs"], results["mappings"]) == (20, 200)
    assert results["seed_seconds"] > 0
    here = results["in_process"]
    assert here["entries"] == 200, here
    assert 0 < here["load_seconds"] <= min(here["load_seconds_all"]) + 1e-9 and len(here["load_seconds_all"]) == 2
    assert 0 < here["held_mb"] <= here["peak_mb"], here
    router = results["router"]
    assert router["entries"] == 200, router
    assert router["start_to_loaded_seconds"] > 0, router
    assert 0 < router["rss_mb"] <= router["hwm_mb"] <= router["hwm_after_changes_mb"], router
    assert results["router_empty"]["rss_mb"] > 0, results
    assert router["reload_seconds_mean"] > 0, router
    assert router["change_to_cache_ms"]["changes"] == 2 and router["change_to_cache_ms"]["p50"] > 0, router
    assert results["target"]["met"] is None  # judged at 100,000 mappings only
    with psycopg.connect(libpq_url(migrated)) as conn:
        left = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (results["database"],)).fetchone()
    assert left == (0,), "the scratch database was not dropped"
