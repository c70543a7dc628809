"""What a replay republishes: every record as it was, plus the run's replay id; dead letters go home."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from replay.selection import DEAD_LETTER_HEADERS
from shared import events
from shared.kafka import dead_letter_headers
from shared.settings import Settings
from shared.topics import Topics
from tests.replay.support import Out, event, own_settings, produce, raw, read, replay
from tests.support.kafka import Record
from tests.support.sentry import issue_body
from tests.support.writer import ignored, make_org, routed

pytestmark = pytest.mark.integration


def without_replay_id(record: Record) -> dict[str, str]:
    return {k: v for k, v in record.headers.items() if k != events.H_REPLAY_ID}


def as_sent(out: Out) -> tuple[bytes | None, bytes, dict[str, str]]:
    return out.key, out.value, {k: v.decode() for k, v in out.headers}


@pytest.mark.parametrize("topic", ["raw", "routed", "ignored"])
async def test_records_are_republished_intact_with_a_replay_id(
    topics: Settings, sessions: async_sessionmaker[AsyncSession], topic: str
) -> None:
    settings = await own_settings(topics, topic)
    t = Topics.from_settings(settings)
    org = await make_org(sessions)
    sent = {
        "raw": [raw(t, org.slug, issue_body(str(i), project="proj-0"), minute=i) for i in range(5)],
        "routed": [event(t, routed(org, issue=str(i)), minute=i) for i in range(5)],
        "ignored": [event(t, ignored(org), minute=i) for i in range(5)],
    }[topic]
    # A record an earlier replay republished gets this run's id instead of the earlier one.
    earlier = sent[0]
    sent[0] = Out(earlier.topic, earlier.value, earlier.key, [*earlier.headers, (events.H_REPLAY_ID, b"old")], 0)
    await produce(settings, sent)

    summary = await replay(settings, topic, 0, 10)

    assert (summary.counts.selected, summary.counts.republished) == (5, 5)
    replay_id = summary.options.replay_id
    assert len(replay_id) == 32
    again = await read(settings, t.all(), replay_id)
    assert {r.topic for r in again} == {getattr(t, topic)}
    assert all(r.headers[events.H_REPLAY_ID] == replay_id for r in again)
    expected = [
        as_sent(Out(o.topic, o.value, o.key, [h for h in o.headers if h[0] != events.H_REPLAY_ID])) for o in sent
    ]
    assert sorted((r.key, r.value, without_replay_id(r)) for r in again) == sorted(expected, key=repr)


async def test_dead_letters_go_back_to_their_topic_without_dead_letter_headers(topics: Settings) -> None:
    settings = await own_settings(topics, "dlq")
    t = Topics.from_settings(settings)
    org = f"org-{uuid.uuid4().hex[:8]}"
    originals = {
        t.raw: raw(t, org, b"{not json", minute=1),
        t.routed: Out(t.routed, b'{"v": 99}', b"some-key", [(events.H_ORG, org.encode())], 2),
    }
    letters = []
    for topic, out in originals.items():
        headers = dead_letter_headers(
            out.headers, error="bad", stage="router.decode", topic=topic, partition=1, offset=4
        )
        letters.append(Out(t.dlq, out.value, out.key, headers, minute=3))
    stranger = dead_letter_headers([], error="x", stage="y", topic="somebody.elses.topic", partition=0, offset=0)
    letters.append(Out(t.dlq, b"{}", None, stranger, minute=4))
    await produce(settings, letters)

    summary = await replay(settings, "dlq", 0, 10)

    assert (summary.counts.selected, summary.counts.republished, summary.skipped) == (3, 2, 1)
    again = {r.topic: r for r in await read(settings, t.all(), summary.options.replay_id)}
    assert set(again) == {t.raw, t.routed}
    for topic, record in again.items():
        assert not DEAD_LETTER_HEADERS & set(record.headers)
        assert (record.key, record.value, without_replay_id(record)) == as_sent(originals[topic])
        assert record.headers[events.H_REPLAY_ID] == summary.options.replay_id


async def test_a_dry_run_republishes_nothing(topics: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
    settings = await own_settings(topics, "dry")
    t = Topics.from_settings(settings)
    org = await make_org(sessions)
    await produce(settings, [event(t, ignored(org, project=p), minute=1) for p in ("a", "a", "b")])

    summary = await replay(settings, "ignored", 0, 10, dry_run=True)

    assert (summary.counts.scanned, summary.counts.selected, summary.counts.republished) == (3, 3, 0)
    assert dict(summary.by_project) == {f"{org.slug}/a": 2, f"{org.slug}/b": 1}
    assert dict(summary.by_reason) == {"unmapped": 3}
    assert summary.diff is None
    assert await read(settings, t.all(), summary.options.replay_id) == []
