"""``ingest.deadlines``: asyncio.timeout's behaviour for many bounds of one length on one timer,
under asyncio's loop and under uvloop (what uvicorn runs ingest on)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from ingest.deadlines import Deadline, Deadlines

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[None]]], None]:
    def runner(main: Callable[[], Awaitable[None]]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            r.run(asyncio.wait_for(main(), 10))  # a broken timer fails, not hangs

    return runner


def test_an_await_that_finishes_in_time_is_left_alone(run: Callable[..., None]) -> None:
    async def main() -> None:
        deadlines = Deadlines(0.2)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.call_later(0.01, future.set_result, "acked")
        with deadlines.bound() as bound:
            assert await future == "acked"
        assert not bound.expired
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0.3)  # past the deadline: nothing is cancelled afterwards
        assert task.cancelling() == 0

    run(main)


def test_an_await_past_the_deadline_raises_timeout_error_at_the_deadline(run: Callable[..., None]) -> None:
    async def main() -> None:
        deadlines = Deadlines(0.1)
        loop = asyncio.get_running_loop()
        never = loop.create_future()
        started = loop.time()
        with pytest.raises(TimeoutError), deadlines.bound():
            await never
        assert 0.09 <= loop.time() - started < 1.0
        assert never.cancelled()  # the awaited future is cancelled, as under asyncio.timeout
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # the expiry's cancel was taken back
        await asyncio.sleep(0)  # and the task goes on normally

    run(main)


def test_concurrent_bounds_expire_each_at_its_own_deadline_on_one_timer(run: Callable[..., None]) -> None:
    async def main() -> None:
        deadlines = Deadlines(0.15)
        loop = asyncio.get_running_loop()
        outcomes: dict[int, tuple[str, float]] = {}
        release = {n: loop.create_future() for n in range(40)}

        async def one(n: int) -> None:
            started = loop.time()
            try:
                with deadlines.bound():
                    await release[n]
                outcomes[n] = ("acked", loop.time() - started)
            except TimeoutError:
                outcomes[n] = ("timeout", loop.time() - started)

        tasks = []
        for n in range(40):
            tasks.append(asyncio.create_task(one(n)))
            await asyncio.sleep(0.005)  # entered 5 ms apart: deadlines 5 ms apart
            if n % 2 == 0:
                release[n].set_result(None)  # even ones are acknowledged at once
        await asyncio.gather(*tasks)
        assert {n for n, (what, _) in outcomes.items() if what == "acked"} == set(range(0, 40, 2))
        for n in range(1, 40, 2):
            what, took = outcomes[n]
            assert what == "timeout" and 0.14 <= took < 0.15 + 0.5, (n, took)
        assert deadlines.waiting == 0  # the timer let go of every bound

    run(main)


def test_a_cancellation_from_outside_is_not_turned_into_a_timeout(run: Callable[..., None]) -> None:
    async def main() -> None:
        deadlines = Deadlines(5.0)
        entered = asyncio.Event()

        async def bounded() -> None:
            with deadlines.bound():
                entered.set()
                await asyncio.get_running_loop().create_future()

        task = asyncio.create_task(bounded())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadlines.close()

    run(main)


def test_an_expiry_and_a_cancellation_from_outside_at_once_stay_a_cancellation(run: Callable[..., None]) -> None:
    """The timer's cancel and someone else's in the same loop iteration (before the task runs
    again): the task ends cancelled, as under asyncio.timeout. The timer's part is done by hand
    (``_expire``, what the timer calls) to make the two land together."""

    async def main() -> None:
        deadlines = Deadlines(5.0)
        entered: asyncio.Future[Deadline] = asyncio.get_running_loop().create_future()

        async def bounded() -> None:
            with deadlines.bound() as bound:
                entered.set_result(bound)
                await asyncio.get_running_loop().create_future()

        task = asyncio.create_task(bounded())
        (await entered)._expire()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadlines.close()

    run(main)
