"""``blametrail replay reset-offsets``: the plan, --execute, and the refusal while a group is active."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from replay.offsets import commit_offsets
from shared import events
from shared.settings import Settings
from shared.topics import Topics
from tests.replay.support import Out, at, cli, own_settings, produce
from tests.support import wait_until

pytestmark = pytest.mark.integration


async def committed(settings: Settings, group: str) -> dict[tuple[str, int], int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


def reset(settings: Settings, group: str, minute: float, *extra: str) -> dict[str, object]:
    done = cli(settings, "replay", "reset-offsets", "--group", group, "--to-datetime", events.rfc3339(at(minute)),
               "--json", *extra)  # fmt: skip
    assert done.returncode == 0, done.stderr
    plan: dict[str, object] = json.loads(done.stdout)
    return plan


def moves(plan: dict[str, object]) -> Sequence[tuple[str, int, int | None, int]]:
    partitions = plan["partitions"]
    assert isinstance(partitions, list)
    return sorted((p["topic"], p["partition"], p["current"], p["new"]) for p in partitions)


async def test_plan_then_execute_on_an_idle_group(topics: Settings) -> None:
    settings = await own_settings(topics, "reset")
    t = Topics.from_settings(settings)
    # Six records in partition 1 at minutes 0..5; partitions 0 and 2 stay empty.
    await produce(settings, [Out(t.raw, b"{}", b"k", minute=m, partition=1) for m in range(6)])
    await commit_offsets(settings, settings.router_group, {TopicPartition(t.raw, 1): 6, TopicPartition(t.raw, 0): 0})

    plan = reset(settings, "router", 2.5)
    assert (plan["group"], plan["executed"]) == (settings.router_group, False)
    assert moves(plan) == [(t.raw, 0, 0, 0), (t.raw, 1, 6, 3), (t.raw, 2, None, 0)]
    assert await committed(settings, settings.router_group) == {(t.raw, 1): 6, (t.raw, 0): 0}  # unchanged

    done = cli(settings, "replay", "reset-offsets", "--group", "router", "--to-datetime", events.rfc3339(at(2.5)))
    assert done.returncode == 0, done.stderr
    assert "TOPIC" in done.stdout and "--execute" in done.stdout

    executed = reset(settings, "router", 2.5, "--execute")
    assert executed["executed"] is True
    assert moves(executed) == moves(plan)
    assert await committed(settings, settings.router_group) == {(t.raw, p): new for _, p, _, new in moves(plan)}

    # Past the last record: every partition's end (Kafka's --to-datetime).
    assert [m[3] for m in moves(reset(settings, "router", 30))] == [0, 6, 0]
    writer = reset(settings, "writer", 0)
    assert {(m[0], m[1]) for m in moves(writer)} == {(x, p) for x in (t.routed, t.ignored) for p in range(3)}


async def test_an_active_group_is_refused(topics: Settings) -> None:
    settings = await own_settings(topics, "active")
    t = Topics.from_settings(settings)
    member = AIOKafkaConsumer(
        t.routed,
        t.ignored,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.writer_group,
        enable_auto_commit=False,
    )
    await member.start()
    try:

        async def assigned() -> bool:
            await member.getmany(timeout_ms=100)
            return bool(member.assignment())

        await wait_until(assigned, within=30, what="the group member's assignment")
        done = cli(settings, "replay", "reset-offsets", "--group", "writer", "--to-datetime", "1h", "--execute")
    finally:
        await member.stop()
    assert done.returncode == 1
    assert done.stderr.strip().startswith("blametrail: error: consumer group")
    assert "active member" in done.stderr
    assert await committed(settings, settings.writer_group) == {}
