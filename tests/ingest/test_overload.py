"""Load shedding: a stalled event loop or too many requests in flight get 503 ``overloaded`` at once.

In-process: the real app (``fake_app.fake_ingest``) with a fake broker that acknowledges, called
through httpx's ASGI transport on the test's own event loop, so the test can stall that loop (a
blocking ``time.sleep``, what CPU starvation looks like from inside the process) and hold request
bodies open to fill the in-flight slots. Waiting is by events and deadlines, never by sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from starlette.applications import Starlette

from ingest.app import LoadMonitor
from shared import metrics
from shared.security import sign
from shared.settings import Settings
from tests.ingest.fake_app import SECRETS, fake_ingest
from tests.ingest.fake_kafka import Harness
from tests.support import wait_until
from tests.support.metrics import local

SECRET = SECRETS["acme"][0]
URL = "http://ingest/webhooks/sentry/acme"
STALL = 0.4  # seconds the loop is held; above the 0.25 s threshold, well below Sentry's 1 s


def webhook(n: int) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps({"action": "created", "data": {"issue": {"id": str(1000 + n), "project": {"slug": "web"}}}})
    headers = {
        "Content-Type": "application/json",
        "Sentry-Hook-Resource": "issue",
        "Sentry-Hook-Signature": sign(SECRET, body),
    }
    return body, headers


def overloaded_count() -> float:
    return local("blametrail_ingest_requests_total", resource="issue", outcome="overloaded")


def assert_overloaded(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "overloaded"
    assert response.headers["Retry-After"] == "1"


@pytest.fixture
async def ingest_harness(tmp_path: Path) -> AsyncIterator[tuple[Starlette, Harness]]:
    async with fake_ingest(tmp_path, Settings(spool_dir=str(tmp_path))) as (app, harness):
        yield app, harness


@pytest.fixture
async def ingest(tmp_path: Path) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    settings = Settings(spool_dir=str(tmp_path), ingest_overload_max_requests=3)
    async with fake_ingest(tmp_path, settings) as (app, _harness):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), timeout=10) as client:
            yield app, client


async def post(client: httpx.AsyncClient, n: int) -> httpx.Response:
    body, headers = webhook(n)
    return await client.post(URL, content=body, headers=headers)


async def held_post(
    client: httpx.AsyncClient, n: int, release: asyncio.Event, reading: asyncio.Event | None = None
) -> httpx.Response:
    """A webhook whose body is sent only once ``release`` is set (``reading`` is set when ingest asks)."""

    async def body() -> AsyncIterator[bytes]:
        if reading is not None:
            reading.set()
        await release.wait()
        yield webhook(n)[0]

    return await client.post(URL, content=body(), headers=webhook(n)[1])


async def test_normal_load_is_accepted(ingest: tuple[Starlette, httpx.AsyncClient]) -> None:
    app, client = ingest
    before = overloaded_count()
    for start in range(0, 60, 3):  # three at a time: at the in-flight limit, not over it
        answers = await asyncio.gather(*(post(client, n) for n in range(start, start + 3)))
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert overloaded_count() == before
    load: LoadMonitor = app.state.load
    assert load.current_lag() < 0.25 and load.inflight == 0


async def test_a_stalled_event_loop_sheds_at_once_then_recovers(
    ingest: tuple[Starlette, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, client = ingest
    measured: list[float] = []
    set_gauge = metrics.INGEST_LOOP_LAG.set

    def record(value: float) -> None:
        measured.append(value)
        set_gauge(value)

    monkeypatch.setattr(metrics.INGEST_LOOP_LAG, "set", record)
    assert (await post(client, 0)).status_code == 200
    before = overloaded_count()

    release = asyncio.Event()
    time.sleep(STALL)  # noqa: ASYNC251 -- the stall under test: nothing else in this process runs meanwhile
    started = time.monotonic()
    # After the stall the first request is alone in flight and served (its body arrives later); the
    # ones queued behind it are shed.
    first = asyncio.create_task(held_post(client, 1, release))
    answers = await asyncio.gather(*(post(client, n) for n in range(2, 5)))
    elapsed = time.monotonic() - started
    for answer in answers:
        assert_overloaded(answer)
    assert elapsed < 0.25, f"shedding took {elapsed:.3f} s"
    assert overloaded_count() == before + 3
    release.set()
    assert (await asyncio.wait_for(first, timeout=5)).status_code == 200

    # The ticker measured the stall, and the next on-time tick ends the shedding: a burst is served.
    assert max(measured) >= STALL - 0.1, measured

    async def on_time() -> bool:
        return bool(measured) and measured[-1] < 0.25

    await wait_until(on_time, within=5, what="an on-time tick after the stall")
    burst = await asyncio.gather(post(client, 5), held_post(client, 6, release), post(client, 7))
    assert [a.status_code for a in burst] == [200, 200, 200], [a.text for a in burst]


async def test_too_many_requests_in_flight_are_shed(ingest: tuple[Starlette, httpx.AsyncClient]) -> None:
    app, client = ingest
    release = asyncio.Event()
    reading = [asyncio.Event() for _ in range(3)]

    # Ingest started reading these requests' bodies once their ``reading`` is set: they are in flight.
    holding = [asyncio.create_task(held_post(client, n, release, reading[n])) for n in range(3)]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in reading)), timeout=5)
    assert app.state.load.inflight == 3
    before = overloaded_count()

    started = time.monotonic()
    assert_overloaded(await post(client, 10))
    assert time.monotonic() - started < 0.25
    assert overloaded_count() == before + 1

    release.set()
    answers = await asyncio.wait_for(asyncio.gather(*holding), timeout=5)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert (await post(client, 11)).status_code == 200
    assert overloaded_count() == before + 1


async def test_queueing_inside_ingest_sheds_then_recovers(ingest_harness: tuple[Starlette, Harness]) -> None:
    """Every answer slow although the loop ticks on time (here: Kafka hangs and the publish timeout is
    long): the fastest answers of an interval took over twice the lag limit, so the next is shed."""
    app, harness = ingest_harness
    harness.broker.mode = "hang"
    harness.publisher._timeout = 0.6  # each webhook then takes 0.6 s before it is spooled
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), timeout=10) as client:
        before = overloaded_count()
        slow = await asyncio.gather(*(post(client, n) for n in range(6)))
        assert [a.json()["status"] for a in slow] == ["spooled"] * 6
        harness.broker.recover()
        load: LoadMonitor = app.state.load

        async def measured() -> bool:  # the tick after those answers closes their interval
            return load.queueing >= 0.5

        await wait_until(measured, within=2, what="the slow answers measured as queueing")
        assert_overloaded(await post(client, 10))
        assert overloaded_count() == before + 1

        async def accepted() -> bool:
            return (await post(client, 11)).status_code == 200

        await wait_until(accepted, within=5, what="a webhook accepted once the backlog is gone")
