"""The window a replay reads: record times, filters, --limit, the rate, and windows with nothing in them."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from replay import ReplayError
from replay.progress import Counts
from replay.throttle import TokenBucket
from replay.window import parse_time
from shared import events
from shared.events import Reason
from shared.settings import Settings
from shared.topics import Topics
from tests.replay.support import at, event, own_settings, produce, raw, read, replay
from tests.support import wait_until
from tests.support.sentry import issue_body
from tests.support.writer import ignored, make_org

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01T12:00:00Z", datetime(2026, 11, 1, 12, 0, tzinfo=UTC)),
        ("2026-11-01T14:00:00+02:00", datetime(2026, 11, 1, 12, 0, tzinfo=UTC)),
        ("2026-11-01T12:00:00", datetime(2026, 11, 1, 12, 0, tzinfo=UTC)),  # no zone: UTC
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("90m", NOW - timedelta(minutes=90)),
        ("24h", NOW - timedelta(hours=24)),
        ("7d", NOW - timedelta(days=7)),
    ],
)
def test_times_are_rfc3339_or_an_age(text: str, expected: datetime) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "24", "-3h", "2026-13-01T00:00:00Z"])
def test_a_bad_time_is_a_replay_error(text: str) -> None:
    with pytest.raises(ReplayError, match="RFC 3339"):
        parse_time(text, NOW)


async def test_the_window_is_chosen_by_record_time(topics: Settings) -> None:
    settings = await own_settings(topics, "time")
    t = Topics.from_settings(settings)
    org = f"org-{uuid.uuid4().hex[:8]}"
    records = [raw(t, org, issue_body(str(100 + m), project="web"), minute=m) for m in range(0, 60, 10)]
    await produce(settings, records)

    summary = await replay(settings, "raw", 15, 45)

    assert (summary.counts.scanned, summary.counts.selected, summary.counts.republished) == (3, 3, 3)
    again = await read(settings, [t.raw], summary.options.replay_id)
    sent_at = {r.headers[events.H_RECEIVED_AT] for r in again}
    assert sent_at == {events.rfc3339(at(m)) for m in (20, 30, 40)}


async def test_a_window_with_no_records_is_an_error(topics: Settings) -> None:
    settings = await own_settings(topics, "empty")
    t = Topics.from_settings(settings)
    await produce(settings, [raw(t, "some-org", issue_body("1"), minute=0)])
    with pytest.raises(ReplayError, match=r"no records in .* between"):
        await replay(settings, "raw", 5, 30)
    with pytest.raises(ReplayError, match="no records in"):
        await replay(settings, "routed", -10, 10)


async def test_filters_org_project_reason_and_limit(
    topics: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    settings = await own_settings(topics, "filters")
    t = Topics.from_settings(settings)
    org = await make_org(sessions)
    other = f"other-{uuid.uuid4().hex[:6]}"
    await produce(
        settings,
        [
            raw(t, org.slug, issue_body("1", project="web"), 1),
            raw(t, org.slug, issue_body("2", project="api"), 2),
            raw(t, org.slug, issue_body("3", project="web"), 3),
            raw(t, other, issue_body("4", project="web"), 4),
            event(t, ignored(org, project="web", reason=Reason.UNMAPPED), 5),
            event(t, ignored(org, project="web", reason=Reason.MAPPING_INACTIVE), 6),
            event(t, ignored(org, project="api", reason=Reason.UNMAPPED), 7),
        ],
    )

    by_org = await replay(settings, "raw", 0, 10, org=org.slug, dry_run=True)
    assert (by_org.counts.scanned, by_org.counts.selected) == (4, 3)
    by_project = await replay(settings, "raw", 0, 10, project="web", dry_run=True)
    assert by_project.counts.selected == 3
    assert dict(by_project.by_project) == {f"{org.slug}/web": 2, f"{other}/web": 1}
    both = await replay(settings, "raw", 0, 10, org=org.slug, project="web", dry_run=True)
    assert both.counts.selected == 2

    by_reason = await replay(settings, "ignored", 0, 10, reason="unmapped")
    assert (by_reason.counts.selected, by_reason.counts.republished) == (2, 2)
    assert dict(by_reason.by_reason) == {"unmapped": 2}
    again = await read(settings, [t.ignored], by_reason.options.replay_id)
    assert sorted(r.json()["project_slug"] for r in again) == ["api", "web"]
    reason_and_project = await replay(settings, "ignored", 0, 10, reason="unmapped", project="api", dry_run=True)
    assert reason_and_project.counts.selected == 1

    limited = await replay(settings, "raw", 0, 10, org=org.slug, limit=2)
    assert (limited.counts.selected, limited.counts.republished) == (2, 2)
    assert len(await read(settings, [t.raw], limited.options.replay_id)) == 2

    with pytest.raises(ReplayError, match="unknown org"):
        await replay(settings, "raw", 0, 10, org="no-such-org-anywhere")


async def test_the_rate_limits_republishing(topics: Settings) -> None:
    settings = await own_settings(topics, "rate")
    t = Topics.from_settings(settings)
    await produce(settings, [raw(t, "rate-org", issue_body(str(i)), minute=i / 10) for i in range(30)])

    rate = 20.0
    burst = TokenBucket(rate).burst
    started = time.monotonic()
    summary = await replay(settings, "raw", 0, 10, rate=rate)
    elapsed = time.monotonic() - started

    assert summary.counts.republished == 30
    # A token bucket of ``burst`` tokens refilled at ``rate``: 30 records take at least this long.
    assert elapsed >= (30 - burst) / rate - 0.05, elapsed


async def test_a_bucket_never_exceeds_its_rate() -> None:
    bucket = TokenBucket(200.0)
    started = time.monotonic()
    for _ in range(100):
        await bucket.take()
    assert time.monotonic() - started >= (100 - bucket.burst) / 200.0 - 0.01


async def test_stop_ends_the_replay_with_what_was_republished(topics: Settings) -> None:
    settings = await own_settings(topics, "stop")
    t = Topics.from_settings(settings)
    await produce(settings, [raw(t, "stop-org", issue_body(str(i)), minute=i / 10) for i in range(40)])

    stop = asyncio.Event()
    shown: list[Counts] = []
    task = asyncio.create_task(replay(settings, "raw", 0, 10, rate=10.0, stop=stop, progress=Watch(shown)))
    await wait_until(lambda: _republished(shown, 3), within=30, what="3 records republished")
    stop.set()
    summary = await asyncio.wait_for(task, 30)

    assert summary.interrupted
    assert 3 <= summary.counts.republished < 40
    assert len(await read(settings, [t.raw], summary.options.replay_id)) == summary.counts.republished


class Watch:
    """A progress display that keeps the counts it is shown."""

    def __init__(self, shown: list[Counts]) -> None:
        self.shown = shown

    def __call__(self, replay_id: str, estimate: int) -> Watch:
        return self

    def update(self, counts: Counts) -> None:
        self.shown[:] = [counts]

    def close(self) -> None:
        pass


async def _republished(shown: list[Counts], count: int) -> bool:
    return bool(shown) and shown[0].republished >= count
