"""``replay reset-offsets``: move a consumer group to a time, as ``kafka-consumer-groups --reset-offsets
--to-datetime`` does (each partition's first offset at or after the time, its end when none).

Refused while the group has active members; a plan only, unless ``execute``, which commits the new
offsets as the group (a consumer with its ``group_id``, ``assign``-ed, never subscribed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from replay import ReplayError
from replay.window import epoch_ms, group_less_consumer, offsets_at, partitions_of
from shared.settings import Settings
from shared.topics import Topics

GROUPS = ("router", "writer")


@dataclass(frozen=True)
class Move:
    topic: str
    partition: int
    current: int | None  # the committed offset; None when the group never committed one
    new: int


@dataclass(frozen=True)
class Plan:
    group: str
    at: datetime
    moves: list[Move]
    executed: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "to_datetime": self.at.isoformat(),
            "executed": self.executed,
            "partitions": [vars(m) for m in self.moves],
        }


def group_and_topics(settings: Settings, which: str) -> tuple[str, list[str]]:
    """``router``: the router group over raw; ``writer``: the writer group over routed + ignored."""
    topics = Topics.from_settings(settings)
    if which == "router":
        return settings.router_group, [topics.raw]
    if which == "writer":
        return settings.writer_group, [topics.routed, topics.ignored]
    raise ReplayError(f"unknown group {which!r}: choose router or writer")


async def _committed(settings: Settings, group: str) -> dict[TopicPartition, int]:
    """The group's committed offsets; a :class:`ReplayError` while it has active members."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="blametrail-replay")
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
        # DescribeGroupsResponse groups: (error_code, group_id, state, protocol_type, protocol, members, …)
        [described] = response.groups
        if described[5]:
            raise ReplayError(
                f"consumer group {group} has {len(described[5])} active member(s) (state {described[2]}); "
                "stop its consumers before resetting its offsets"
            )
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


async def _new_offsets(settings: Settings, topics: list[str], at: datetime) -> dict[TopicPartition, int]:
    consumer = group_less_consumer(settings)
    await consumer.start()
    try:
        partitions = await partitions_of(consumer, topics)
        return await offsets_at(consumer, partitions, epoch_ms(at), await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


async def commit_offsets(settings: Settings, group: str, offsets: dict[TopicPartition, int]) -> None:
    """Commit ``offsets`` as ``group`` without joining it (the broker refuses while it has members)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group,
        client_id="blametrail-replay",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


async def reset_offsets(settings: Settings, which: str, at: datetime, *, execute: bool) -> Plan:
    group, topics = group_and_topics(settings, which)
    current = await _committed(settings, group)
    new = await _new_offsets(settings, topics, at)
    if execute:
        await commit_offsets(settings, group, new)
    moves = [Move(tp.topic, tp.partition, current.get(tp), offset) for tp, offset in sorted(new.items())]
    return Plan(group, at, moves, executed=execute)
