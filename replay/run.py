"""One replay run: read the window, select, and republish throttled with a replay id (or a dry run).

raw → raw (the live router routes it again with today's mappings); routed / ignored → the same
topic (the writer's input again); dlq → the topic each dead letter came from, without the
dead-letter headers. Every republished record keeps its key, value and other headers and gets the
run's ``replay_id`` header; the run waits for every acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from replay import ReplayError
from replay.diff import RoutingDiff
from replay.progress import Counts, Progress, progress_for
from replay.selection import DEAD_LETTER_HEADERS, ORIGINAL_TOPIC, Filters, Seen, inspect
from replay.throttle import TokenBucket
from replay.window import WindowReader
from shared import events
from shared.db.session import create_engine, sessionmaker
from shared.errors import DomainError
from shared.kafka import Headers, make_producer
from shared.orgs import get_org
from shared.settings import Settings
from shared.topics import Topics

log = logging.getLogger("blametrail.replay")

TOPIC_KINDS = ("raw", "routed", "ignored", "dlq")
DEFAULT_RATE = 500.0


@dataclass(frozen=True)
class Options:
    topic: str  # one of TOPIC_KINDS
    start: datetime
    end: datetime
    filters: Filters = field(default_factory=Filters)
    limit: int | None = None
    rate: float = DEFAULT_RATE
    dry_run: bool = False
    replay_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Summary:
    options: Options
    source: str  # the topic's full name
    counts: Counts = field(default_factory=Counts)
    skipped: int = 0  # dead letters with no topic of ours to go back to
    interrupted: bool = False
    by_project: Counter[str] = field(default_factory=Counter)  # "org/project" → records selected
    by_reason: Counter[str] = field(default_factory=Counter)  # ignored events selected, by reason
    diff: list[dict[str, Any]] | None = None  # dry run of raw: replay.diff rows

    def as_json(self) -> dict[str, Any]:
        o, c = self.options, self.counts
        return {
            "replay_id": o.replay_id,
            "topic": o.topic,
            "source_topic": self.source,
            "dry_run": o.dry_run,
            "from": events.rfc3339(o.start),
            "to": events.rfc3339(o.end),
            "filters": {"org": o.filters.org, "project": o.filters.project, "reason": o.filters.reason},
            "limit": o.limit,
            "rate": o.rate,
            "scanned": c.scanned,
            "selected": c.selected,
            "republished": c.republished,
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "elapsed_seconds": round(c.elapsed, 3),
            "by_project": dict(sorted(self.by_project.items())),
            "by_reason": dict(sorted(self.by_reason.items())),
            "diff": self.diff,
        }


def republished_headers(record: ConsumerRecord, replay_id: str) -> Headers:
    """The record's headers without dead-letter headers or an earlier replay id, plus ``replay_id``."""
    dropped = DEAD_LETTER_HEADERS | {events.H_REPLAY_ID}
    return [(k, v or b"") for k, v in record.headers if k not in dropped] + [(events.H_REPLAY_ID, replay_id.encode())]


def destination(seen: Seen, topics: Topics) -> str | None:
    """Where a selected record goes: its own topic, or a dead letter's original topic (None: not ours)."""
    if seen.record.topic != topics.dlq:
        return str(seen.record.topic)
    origin = seen.headers.get(ORIGINAL_TOPIC)
    return origin if origin in (topics.raw, topics.routed, topics.ignored) else None


class Republisher:
    """Sends records and counts the acknowledged ones; at most ``max_pending`` unacknowledged."""

    def __init__(self, producer: AIOKafkaProducer, counts: Counts, max_pending: int = 1000) -> None:
        self._producer, self._counts, self._max_pending = producer, counts, max_pending
        self._pending: list[asyncio.Future[Any]] = []

    async def send(self, record: ConsumerRecord, topic: str, headers: Headers) -> None:
        sent = await self._producer.send(topic, value=record.value, key=record.key, headers=headers)
        sent.add_done_callback(self._acked)
        self._pending.append(sent)
        if len(self._pending) >= self._max_pending:
            await self.flush()

    def _acked(self, sent: asyncio.Future[Any]) -> None:
        if not sent.cancelled() and sent.exception() is None:
            self._counts.republished += 1

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending)


async def _check_org(sessions: async_sessionmaker[AsyncSession], slug: str) -> None:
    async with sessions() as session:
        try:
            await get_org(session, slug)
        except DomainError:
            raise ReplayError(f"unknown org {slug!r}") from None


class _Run:
    def __init__(self, settings: Settings, options: Options, diff: RoutingDiff | None) -> None:
        self.settings, self.options, self.diff = settings, options, diff
        self.topics = Topics.from_settings(settings)
        self.summary = Summary(options, getattr(self.topics, options.topic))
        self.bucket = TokenBucket(options.rate)

    async def scan(self, reader: WindowReader, stop: asyncio.Event, progress: Progress) -> None:
        producer = None if self.options.dry_run else make_producer(self.settings, client_id="blametrail-replay")
        if producer is not None:
            await producer.start()
        try:
            republisher = Republisher(producer, self.summary.counts) if producer is not None else None
            async with contextlib.aclosing(reader.records(stop)) as records:
                async for record in records:
                    if not await self._one(record, republisher):
                        break
                    progress.update(self.summary.counts)
            if republisher is not None:
                await republisher.flush()
            progress.update(self.summary.counts)
        except KafkaError as exc:
            raise ReplayError(f"Kafka failed after {self.summary.counts.republished} republished: {exc!r}") from exc
        finally:
            if producer is not None:
                await producer.stop()

    async def _one(self, record: ConsumerRecord, republisher: Republisher | None) -> bool:
        """Scan one record; False once ``--limit`` records were selected."""
        summary, counts = self.summary, self.summary.counts
        counts.scanned += 1
        seen = inspect(record, self.topics)
        if not seen.selected_by(self.options.filters):
            return True
        counts.selected += 1
        summary.by_project.update(f"{seen.org or '?'}/{p or '(none)'}" for p in seen.projects)
        if seen.reason:
            summary.by_reason[seen.reason] += 1
        if self.diff is not None and seen.delivery is not None:
            await self.diff.add(seen.delivery)
        if republisher is not None:
            topic = destination(seen, self.topics)
            if topic is None:
                summary.skipped += 1
            else:
                await self.bucket.take()
                await republisher.send(record, topic, republished_headers(record, self.options.replay_id))
        return self.options.limit is None or counts.selected < self.options.limit


async def run_replay(
    settings: Settings,
    options: Options,
    stop: asyncio.Event,
    progress: Callable[[str, int], Progress] = progress_for,
) -> Summary:
    """Run one replay until its window ends, ``--limit`` records were selected or ``stop`` is set."""
    engine = create_engine(settings, pool_size=2)
    try:
        sessions = sessionmaker(engine)
        if options.filters.org is not None:
            await _check_org(sessions, options.filters.org)
        diff = RoutingDiff(sessions, settings) if options.dry_run and options.topic == "raw" else None
        if diff is not None:
            await diff.load()
        run = _Run(settings, options, diff)
        async with WindowReader(settings, run.summary.source, options.start, options.end) as reader:
            shown = progress(options.replay_id, reader.estimate)
            try:
                await run.scan(reader, stop, shown)
            finally:
                shown.close()
        if diff is not None:
            run.summary.diff = await diff.finish()
    finally:
        await engine.dispose()
    summary = run.summary
    summary.interrupted = stop.is_set()
    _log(summary)
    return summary


def _log(summary: Summary) -> None:
    o, c = summary.options, summary.counts
    log.info(
        "replay %s topic=%s from=%s to=%s org=%s project=%s reason=%s limit=%s rate=%s dry_run=%s: "
        "scanned=%d selected=%d republished=%d skipped=%d interrupted=%s elapsed=%.1fs",
        o.replay_id, summary.source, events.rfc3339(o.start), events.rfc3339(o.end), o.filters.org,
        o.filters.project, o.filters.reason, o.limit, o.rate, o.dry_run,
        c.scanned, c.selected, c.republished, summary.skipped, summary.interrupted, c.elapsed,
        extra={"replay_id": o.replay_id},
    )  # fmt: skip
