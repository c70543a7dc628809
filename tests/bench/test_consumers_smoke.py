"""``bench.consumers`` at a tiny size, against the real broker and database: a check that the harness
works (fill, passthrough, ``blametrail router`` and ``blametrail writer`` as processes, ``COPY``), not a
benchmark. At a few hundred events a drain can fit in one batch; the harness must still report it."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from bench import consumers
from shared.db.conninfo import libpq_url
from shared.settings import Settings

pytestmark = pytest.mark.integration

EVENTS = 300


def test_consumers_drains_every_stage_and_cleans_up_its_copies(migrated: Settings, tmp_path: Path) -> None:
    run_dir = tmp_path / "stack"  # what bench.consumers reads of a stack started by scripts/up.sh
    run_dir.mkdir()
    (run_dir / "postgres.env").write_text(f"BLAMETRAIL_DATABASE_URL={migrated.database_url}\n")
    (run_dir / "kafka.env").write_text(f"BLAMETRAIL_KAFKA_BOOTSTRAP={migrated.kafka_bootstrap}\n")

    results = consumers.run(run_dir, EVENTS, within=120)

    assert results["passthrough"]["events"] == EVENTS, results
    for stage in ("router", "writer"):
        assert results[stage]["drained"] is True, results
        assert results[stage]["cpu_ms_per_event"] >= 0 and results[stage]["events_per_s"] >= 0, results
    raw = results["topic_prefix"] + "sentry.webhooks.raw"
    with psycopg.connect(libpq_url(migrated)) as conn:
        row = conn.execute("SELECT count(*) FROM audit_records WHERE raw_topic = %s", (raw,)).fetchone()
    assert row is not None and row[0] == EVENTS, row  # one audit record an event; the copies deleted again
    assert results["copy"]["events"] == EVENTS, results
