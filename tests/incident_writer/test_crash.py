"""SIGKILL the writer at random points of a 20,000-event stream, restart it, repeatedly: counts stay exact.

Every kill lands somewhere in decode → transaction → dead-letter → offset commit; whatever was
committed in Postgres but not in Kafka comes again and must change nothing. Each restart waits for
the killed member's session to expire (aiokafka's 10 s), so the number of kills is what the time
budget allows.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.settings import Settings
from tests.support import ServiceProcess, settings_env, wait_until
from tests.support.writer import (
    assert_exact,
    audit_count,
    committed_total,
    isolated_settings,
    make_org,
    produce,
    workload,
)

pytestmark = pytest.mark.integration

EVENTS = 20_000
KILLS = 3


async def test_writer_killed_at_random_points_and_restarted_leaves_exact_counts(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    seed = int(os.environ.get("BLAMETRAIL_TEST_SEED", time.time_ns() % 100_000))
    print(f"seed {seed} (BLAMETRAIL_TEST_SEED={seed} repeats this run)")
    rng = random.Random(seed)
    settings = await isolated_settings(migrated, "kill")
    org = await make_org(sessions, services=3)
    expected = workload(org, events=EVENTS, issues=300, seed=seed)
    started = time.monotonic()
    total = await produce(settings, expected.events, linger_ms=50)
    print(f"produced {total} events in {time.monotonic() - started:.1f}s")
    env = settings_env(settings)

    writer = ServiceProcess("writer", env, tmp_path)
    killed_at: list[int] = []
    try:
        for k in range(KILLS):
            low, high = (k + 0.3) / (KILLS + 1), (k + 1) / (KILLS + 1)
            target = int(expected.deliveries * rng.uniform(low, high))

            async def reached(process: ServiceProcess = writer, target: int = target) -> bool:
                assert process.alive(), process.output()
                return await audit_count(sessions, org.slug) >= target

            await wait_until(reached, within=40, what=f"the writer to pass {target} audit records")
            await asyncio.sleep(rng.uniform(0, 0.05))  # a random point inside the batch now being written
            writer.kill()
            killed_at.append(await audit_count(sessions, org.slug))
            writer.stop()
            writer = ServiceProcess("writer", env, tmp_path)

        async def done(process: ServiceProcess = writer) -> bool:
            assert process.alive(), process.output()
            return await committed_total(settings, settings.writer_group) == total

        await wait_until(done, within=60, what="the last writer to commit the whole stream")
    finally:
        code = writer.stop()
    assert code == 0, writer.output()
    print(f"killed at {killed_at} of {expected.deliveries} audit records; {time.monotonic() - started:.1f}s")
    assert len(killed_at) == KILLS and all(0 < n < expected.deliveries for n in killed_at), killed_at
    await assert_exact(sessions, org, expected)
