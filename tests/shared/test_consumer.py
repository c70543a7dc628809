"""The consumer runtime's contract, driven through its public surface with an in-memory consumer.

The router and writer tests exercise the same runtime against the real broker; these pin down the
order (side effect → dead letters → commit), retries, rebalances, the dead-letter budget and offsets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    OutOfOrderSequenceNumber,
)
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY

from shared.consumer import (
    Batch,
    ConsumerConfig,
    ConsumerRuntime,
    DeadLetter,
    DeadLetterBudget,
    DeadLetterLimitExceeded,
    OffsetOutOfRange,
    Retry,
    SentLetter,
    Step,
)
from shared.producer import Producer, RenewableProducer

TP0, TP1 = TopicPartition("in", 0), TopicPartition("in", 1)


def record(tp: TopicPartition, offset: int, value: bytes = b"v") -> ConsumerRecord:
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, b"k", value, None, 1, len(value), [("h", b"1")])


class FakeConsumer:
    """Hands out prepared polls (a dict of records, or an exception to raise), then nothing."""

    def __init__(self, *polls: dict[TopicPartition, list[ConsumerRecord]] | Exception) -> None:
        self.polls = list(polls)
        self.assigned = {TP0, TP1}
        self.paused: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.events: list[str] = []
        self.seeks: list[tuple[str, TopicPartition]] = []
        self.drained = asyncio.Event()

    def subscribe(self, topics: list[str], listener: object) -> None:
        self.listener = listener

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]:
        if self.paused or not self.polls:
            if not (self.paused or self.polls):
                self.drained.set()  # every poll handed out, and nothing is waiting for a retry
            await asyncio.sleep(min(timeout_ms, 20) / 1000)
            return {}
        poll = self.polls.pop(0)
        if isinstance(poll, Exception):
            raise poll
        return poll

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.events.append("commit")
        self.commits.append(dict(offsets))

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        self.seeks += [("beginning", tp) for tp in tps]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append(("seek", tp))

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        self.events.append("pause")
        self.paused |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.events.append("resume")
        self.paused -= set(tps)

    def highwater(self, tp: TopicPartition) -> int:
        return 100


class FakeProducer:
    """Acknowledges every send at once, unless ``failures`` holds an error for it."""

    def __init__(self, consumer: FakeConsumer) -> None:
        self.consumer = consumer
        self.failures: list[BaseException] = []
        self.sent: list[tuple[str, bytes, dict[str, bytes]]] = []
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def send(
        self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[object]:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if self.failures:
            future.set_exception(self.failures.pop(0))
            return future
        self.consumer.events.append("dead_letter")
        self.sent.append((topic, value, dict(headers)))
        future.set_result(SimpleNamespace(partition=0, offset=len(self.sent) - 1))
        return future


def restarts(group: str) -> float:
    return REGISTRY.get_sample_value("blametrail_consumer_producer_restarts_total", {"group": group}) or 0.0


def fake_producer(rt: ConsumerRuntime) -> FakeProducer:
    producer = rt.producer
    assert isinstance(producer, FakeProducer)
    return producer


class ScriptedStep(Step):
    """Runs ``script`` in turn for each attempt: a list of dead offsets, or an exception to raise."""

    name = "test"

    def __init__(self, consumer: FakeConsumer, *script: list[int] | BaseException, gate: asyncio.Event | None = None):
        self.consumer = consumer
        self.script = list(script)
        self.gate = gate
        self.started = asyncio.Event()
        self.retries: list[tuple[str, float]] = []
        self.recoveries = 0
        self.audited: list[tuple[int, int, int]] = []

    async def process(self, batch: Batch) -> Sequence[DeadLetter]:
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        step = self.script.pop(0) if self.script else []
        if isinstance(step, BaseException):
            raise step
        self.consumer.events.append("effect")
        return [DeadLetter(r, "cannot be read", "test.decode") for r in batch if r.offset in step]

    def retrying(self, failure: Retry, delay: float) -> None:
        self.retries.append((failure.reason, delay))

    def recovered(self) -> None:
        self.recoveries += 1

    async def dead_lettered(self, sent: Sequence[SentLetter]) -> None:
        self.consumer.events.append("audited")
        self.audited = [(s.letter.record.offset, s.partition, s.offset) for s in sent]


def runtime(consumer: FakeConsumer, step: Step, **config: Any) -> ConsumerRuntime:
    settings: dict[str, Any] = {
        "group": "g",
        "topics": ("in",),
        "dlq_topic": "dlq",
        "batch_max": 100,
        "batch_timeout_ms": 20,
        "revoke_wait_seconds": 0.3,
        "dlq_max_ratio": 0.5,
        "dlq_window": 10,
        "retry_initial_seconds": 0.01,
        "retry_max_seconds": 0.02,
    }
    settings.update(config)
    producers = RenewableProducer(lambda: cast(Producer, FakeProducer(consumer)), "g")
    return ConsumerRuntime(ConsumerConfig(**settings), step, consumer, producers)


async def run_until_drained(rt: ConsumerRuntime, consumer: FakeConsumer) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(rt.run(stop))
    drained = asyncio.create_task(consumer.drained.wait())
    done, _ = await asyncio.wait({task, drained}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert done, "the runtime neither finished the polls nor stopped"
    stop.set()
    drained.cancel()
    await asyncio.wait_for(task, 10)


async def test_commits_offset_plus_one_after_the_effect_and_dead_letters() -> None:
    consumer = FakeConsumer({TP0: [record(TP0, 4), record(TP0, 5)], TP1: [record(TP1, 9)]})
    step = ScriptedStep(consumer, [5])
    rt = runtime(consumer, step)
    await run_until_drained(rt, consumer)
    assert consumer.events == ["effect", "dead_letter", "audited", "commit"]
    assert consumer.commits == [{TP0: 6, TP1: 10}]
    assert step.audited == [(5, 0, 0)]  # the dead letter's place in the DLQ reaches the step
    [(topic, value, headers)] = fake_producer(rt).sent
    assert (topic, value) == ("dlq", b"v")
    assert headers["h"] == b"1" and headers["stage"] == b"test.decode" and headers["error"] == b"cannot be read"
    assert (headers["original_topic"], headers["original_partition"], headers["original_offset"]) == (b"in", b"0", b"5")


async def test_a_bug_stops_the_consumer_with_nothing_committed() -> None:
    consumer = FakeConsumer({TP0: [record(TP0, 1)]})
    rt = runtime(consumer, ScriptedStep(consumer, ZeroDivisionError("bug")))
    with pytest.raises(ZeroDivisionError):
        await asyncio.wait_for(rt.run(asyncio.Event()), 10)
    assert consumer.commits == [] and fake_producer(rt).sent == []


async def test_retry_pauses_retries_the_same_batch_and_resumes() -> None:
    consumer = FakeConsumer({TP0: [record(TP0, 1)]})
    step = ScriptedStep(consumer, Retry("database", "down"), Retry("database", "down"), [])
    await run_until_drained(runtime(consumer, step), consumer)
    assert [reason for reason, _ in step.retries] == ["database", "database"]
    assert [delay for _, delay in step.retries] == [0.01, 0.02]  # doubling up to the maximum
    assert step.recoveries == 1
    runs = [e for n, e in enumerate(consumer.events) if n == 0 or consumer.events[n - 1] != e]
    assert runs == ["pause", "effect", "resume", "commit"]
    assert consumer.commits == [{TP0: 2}] and not consumer.paused


async def test_a_broken_producer_is_replaced_before_the_next_attempt() -> None:
    """aiokafka's idempotent producer can answer ``OutOfOrderSequenceNumber`` to every later batch
    after a broker restart (aiokafka issue 1017): retrying with it would retry forever."""
    consumer = FakeConsumer({TP0: [record(TP0, 1)]})
    fatal = Retry("kafka", "producing failed")
    fatal.__cause__ = OutOfOrderSequenceNumber()
    transient = Retry("kafka", "broker away")
    transient.__cause__ = KafkaConnectionError()
    step = ScriptedStep(consumer, transient, fatal, [])
    rt = runtime(consumer, step)
    first = fake_producer(rt)
    before = restarts("g")
    await run_until_drained(rt, consumer)
    assert [reason for reason, _ in step.retries] == ["kafka", "kafka"]
    assert consumer.commits == [{TP0: 2}]
    second = fake_producer(rt)
    assert second is not first and first.stopped and second.started  # replaced once: after the fatal error only
    assert restarts("g") - before == 1


async def test_a_dead_letter_kafka_did_not_take_is_sent_again_not_lost() -> None:
    consumer = FakeConsumer({TP0: [record(TP0, 4), record(TP0, 5)]})
    step = ScriptedStep(consumer, [5])
    rt = runtime(consumer, step)
    fake_producer(rt).failures.append(KafkaTimeoutError())
    await run_until_drained(rt, consumer)
    assert [reason for reason, _ in step.retries] == ["kafka"]
    assert step.audited == [(5, 0, 0)] and len(fake_producer(rt).sent) == 1
    assert consumer.commits == [{TP0: 6}]


async def test_stop_while_retrying_leaves_the_batch_uncommitted() -> None:
    consumer = FakeConsumer({TP0: [record(TP0, 1)]})
    step = ScriptedStep(consumer, *[Retry("database", "down")] * 1000)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime(consumer, step, retry_initial_seconds=0.05, retry_max_seconds=0.05).run(stop))
    await asyncio.wait_for(step.started.wait(), 5)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert consumer.commits == [] and step.recoveries == 0


async def test_rebalance_waits_for_the_batch_in_flight_then_abandons_it() -> None:
    gate = asyncio.Event()
    consumer = FakeConsumer({TP0: [record(TP0, 4), record(TP0, 5)]})
    step = ScriptedStep(consumer, [], gate=gate)
    rt = runtime(consumer, step)
    stop = asyncio.Event()
    task = asyncio.create_task(rt.run(stop))
    await asyncio.wait_for(step.started.wait(), 5)

    # Revoking partitions the batch does not hold does not wait for it.
    await asyncio.wait_for(rt.on_partitions_revoked({TP1}), 0.2)
    # The batch finishes within the wait: it commits before the revoke returns.
    asyncio.get_running_loop().call_later(0.05, gate.set)
    await asyncio.wait_for(rt.on_partitions_revoked({TP0, TP1}), 5)
    assert consumer.commits == [{TP0: 6}]
    stop.set()
    await asyncio.wait_for(task, 5)

    # A batch stuck past the wait is abandoned: nothing of it is committed.
    gate = asyncio.Event()
    consumer = FakeConsumer({TP1: [record(TP1, 7)]})
    step = ScriptedStep(consumer, [], gate=gate)
    rt = runtime(consumer, step)
    stop = asyncio.Event()
    task = asyncio.create_task(rt.run(stop))
    await asyncio.wait_for(step.started.wait(), 5)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(rt.on_partitions_revoked({TP1}), 5)
    assert asyncio.get_running_loop().time() - started >= 0.3
    gate.set()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert consumer.commits == [] and "effect" in consumer.events


async def test_dead_letter_budget_stops_before_producing() -> None:
    many = {TP0: [record(TP0, n) for n in range(10)]}
    consumer = FakeConsumer(many)
    rt = runtime(consumer, ScriptedStep(consumer, list(range(6))), dlq_max_ratio=0.5, dlq_window=10)
    with pytest.raises(DeadLetterLimitExceeded):
        await asyncio.wait_for(rt.run(asyncio.Event()), 10)
    assert fake_producer(rt).sent == [] and consumer.commits == []


def test_dead_letter_budget_is_a_sliding_window() -> None:
    budget = DeadLetterBudget(max_ratio=0.2, window=10)  # at most 2 of the last 10
    for n in range(10):
        budget.record(dead=n < 2)
    for _ in range(10):
        budget.record(dead=False)  # the two dead ones slid out
    budget.record(dead=True)
    budget.record(dead=True)
    with pytest.raises(DeadLetterLimitExceeded):
        budget.record(dead=True)


def test_one_tenants_bad_records_never_trip_the_budget() -> None:
    budget = DeadLetterBudget(max_ratio=0.1, window=100, min_orgs=3)
    for n in range(1000):
        budget.record(dead=n % 2 == 0, org="acme" if n % 2 == 0 else None)  # half of everything: acme's
    budget.record(dead=True, org="globex")  # two tenants: still not systemic
    with pytest.raises(DeadLetterLimitExceeded, match="3 organizations"):
        budget.record(dead=True, org="initech")


async def test_a_new_group_starts_at_the_beginning_and_out_of_range_fails_loudly() -> None:
    consumer = FakeConsumer(NoOffsetForPartitionError(TP0), {TP0: [record(TP0, 0)]})
    await run_until_drained(runtime(consumer, ScriptedStep(consumer)), consumer)
    assert consumer.seeks == [("beginning", TP0)] and consumer.commits == [{TP0: 1}]

    consumer = FakeConsumer(OffsetOutOfRangeError({TP0: 10**6}))
    with pytest.raises(OffsetOutOfRange, match="reset-offsets"):
        await asyncio.wait_for(runtime(consumer, ScriptedStep(consumer)).run(asyncio.Event()), 10)
    assert consumer.seeks == []


async def test_a_replacement_that_cannot_start_is_discarded_and_tried_again() -> None:
    consumer = FakeConsumer()
    made: list[FakeProducer] = []
    refusals = [KafkaConnectionError()]

    class Refusing(FakeProducer):
        async def start(self) -> None:
            if refusals and len(made) > 1:
                raise refusals.pop()
            await super().start()

    def factory() -> Producer:
        made.append(Refusing(consumer))
        return cast(Producer, made[-1])

    producers = RenewableProducer(factory, "g")
    await producers.start()
    producers.broken("OutOfOrderSequenceNumber")
    with pytest.raises(KafkaConnectionError):
        await producers.ready()  # the broker is away: the half-started successor is dropped
    await producers.ready()
    assert len(made) == 3 and made[0].stopped and made[1].stopped and made[2].started
    assert cast(object, producers.current) is made[2]
