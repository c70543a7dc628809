"""``shared.producer``: waiting for acknowledgements of a producer that may die, replacing one that may not start."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import cast

import pytest
from aiokafka.errors import KafkaError

from shared import producer as module
from shared.producer import Producer, RenewableProducer, acknowledged


async def test_acknowledged_returns_the_results_in_order() -> None:
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    loop.call_soon(second.set_result, "b")
    loop.call_later(0.01, first.set_result, "a")
    assert await acknowledged(cast(Producer, SimpleNamespace()), [first, second]) == ["a", "b"]


async def test_acknowledged_gives_up_when_the_sender_task_died(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiokafka leaves the futures of a dead sender unresolved: without the check this waits for ever."""
    monkeypatch.setattr(module, "ACK_CHECK_SECONDS", 0.02)
    sender = asyncio.create_task(asyncio.sleep(0))
    await sender
    dead = cast(Producer, SimpleNamespace(_sender=SimpleNamespace(sender_task=sender)))
    never: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    with pytest.raises(KafkaError, match="sender task died"):
        await asyncio.wait_for(acknowledged(dead, [never]), 5)


class Hanging:
    """A producer whose start never finishes (aiokafka retrying its producer id while the broker restarts)."""

    def __init__(self, made: list[Hanging]) -> None:
        self.stopped = False
        made.append(self)

    async def start(self) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        self.stopped = True


async def test_a_replacement_that_does_not_start_in_time_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "START_TIMEOUT", 0.05)
    made: list[Hanging] = []
    producers = RenewableProducer(lambda: cast(Producer, Hanging(made)), "g")
    producers.broken("test")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(producers.ready(), 5)
    assert made[0].stopped and len(made) == 2  # the half-started one disposed of, a fresh one waiting
