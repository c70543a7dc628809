"""Postgres stopped mid-run and started again: the writer waits, keeps its group, resumes, loses nothing.

A Postgres of this test's own (``scripts/postgres.sh`` in a run directory under ``tmp_path``) is
stopped for OUTAGE_SECONDS while events keep arriving. ``postgres.sh start`` does not promise the
same port after a stop (the old one is often still in TIME_WAIT), so the writer reaches Postgres
through the TCP forwarder of ``tests/support/outage.py`` on a fixed port — as it would through a
service address in production.
During the outage a second writer joins the group: the first must abandon its stuck batch for the
rebalance to complete, and both resume on their own when the database is back.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from shared.db.migrate import upgrade
from shared.settings import Settings
from tests.support import ServiceProcess, free_port, settings_env, wait_until
from tests.support.metrics import scrape
from tests.support.outage import Forwarder, database, postgres, with_port
from tests.support.writer import (
    assert_exact,
    audit_count,
    committed_total,
    group_members,
    isolated_settings,
    make_org,
    produce,
    workload,
)

pytestmark = pytest.mark.integration

# Shortened from 30 s (see docs/writer.md): with the 0.2 s → 5 s backoff this spans six attempts,
# the last ones at the backoff cap, and a full rebalance with an abandoned batch.
OUTAGE_SECONDS = 30.0


async def test_postgres_outage_pauses_the_writer_and_it_resumes_with_exact_counts(
    migrated: Settings, tmp_path: Path
) -> None:
    run_dir = tmp_path / "pg"
    pg = await asyncio.to_thread(postgres, "start", run_dir)
    env_file = run_dir / "postgres.env"

    def current_port() -> int | None:
        if not env_file.exists():
            return None
        lines = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        return int(lines["PGPORT"]) if "PGPORT" in lines else None

    forwarder = Forwarder(current_port)
    writers: list[ServiceProcess] = []
    try:
        direct = pg["BLAMETRAIL_DATABASE_URL"]
        await asyncio.to_thread(upgrade, Settings(database_url=direct))
        settings = await isolated_settings(migrated.model_copy(update={"database_url": direct}), "outage")
        async with database(direct) as sessions:
            org = await make_org(sessions, services=2)
        expected = workload(org, events=6000, issues=60, seed=21)
        half = len(expected.events) // 2
        total = await produce(settings, expected.events[:half])

        via_forwarder = with_port(direct, await forwarder.start())
        ports = [free_port(), free_port()]

        def start_writer(port: int) -> ServiceProcess:
            writer_settings = settings.model_copy(update={"database_url": via_forwarder, "writer_metrics_port": port})
            process = ServiceProcess("writer", settings_env(writer_settings), tmp_path)
            writers.append(process)
            return process

        first = start_writer(ports[0])
        async with database(direct) as sessions:

            async def progress() -> bool:
                assert first.alive(), first.output()
                return await audit_count(sessions, org.slug) >= 500

            await wait_until(progress, within=30, what="the writer to make progress")
        revoked_before = await scrape(
            ports[0], "blametrail_consumer_rebalances_total", group=settings.writer_group, kind="revoked"
        )

        await asyncio.to_thread(postgres, "stop", run_dir)
        down_at = time.monotonic()
        total += await produce(settings, expected.events[half:])  # events keep coming meanwhile

        async def waiting_and_retrying() -> bool:
            assert first.alive(), first.output()
            up = await scrape(ports[0], "blametrail_writer_database_up")
            retries = await scrape(ports[0], "blametrail_writer_retries_total", reason="database")
            return up == 0 and retries >= 3

        await wait_until(waiting_and_retrying, within=OUTAGE_SECONDS, what="the writer to wait and retry")
        committed_during_outage = await committed_total(settings, settings.writer_group)
        assert await group_members(settings, settings.writer_group) == ("Stable", 1)  # still in the group
        assert (
            await scrape(ports[0], "blametrail_consumer_rebalances_total", group=settings.writer_group, kind="revoked")
            == revoked_before
        )

        second = start_writer(ports[1])  # joins during the outage: the first abandons its stuck batch

        async def rebalanced() -> bool:
            assert first.alive() and second.alive(), first.output() + second.output()
            abandoned = await scrape(
                ports[0], "blametrail_consumer_abandoned_batches_total", group=settings.writer_group
            )
            return abandoned >= 1 and await group_members(settings, settings.writer_group) == ("Stable", 2)

        await wait_until(rebalanced, within=30, what="a rebalance that abandons the stuck batch")

        async def outage_long_enough() -> bool:
            assert first.alive() and second.alive()
            return time.monotonic() - down_at >= OUTAGE_SECONDS

        await wait_until(outage_long_enough, within=OUTAGE_SECONDS + 5, what="the end of the outage")
        assert await committed_total(settings, settings.writer_group) == committed_during_outage
        retries = await scrape(ports[0], "blametrail_writer_retries_total", reason="database")
        assert retries >= 5, retries

        pg = await asyncio.to_thread(postgres, "start", run_dir)

        async def caught_up() -> bool:
            for writer in writers:
                assert writer.alive(), writer.output()
            return await committed_total(settings, settings.writer_group) == total

        await wait_until(caught_up, within=60, what="the writers to catch up after the outage")
        assert [await scrape(port, "blametrail_writer_database_up") for port in ports] == [1, 1]
        codes = [writer.stop() for writer in writers]
        assert codes == [0, 0], "\n".join(w.output()[-3000:] for w in writers)
        async with database(pg["BLAMETRAIL_DATABASE_URL"]) as sessions:
            await assert_exact(sessions, org, expected)
    finally:
        for writer in writers:
            writer.stop()
        await forwarder.close()
        await asyncio.to_thread(postgres, "stop", run_dir)
        data = Path(pg["PGDATA"]).parent
        if tmp_path not in data.parents:  # as root the script keeps the data in /tmp/blametrail-pg-…
            shutil.rmtree(data, ignore_errors=True)
