"""Making an accepted webhook durable: Kafka's acknowledgement, or the local spool, in order.

``Publisher.publish`` is the whole contract of ingest's answer:

- ``ACCEPTED``: Kafka acknowledged the record (``acks=all``, idempotent producer) within
  ``publish_timeout``.
- ``SPOOLED``: Kafka did not acknowledge in time (or cannot be reached, or ``max_inflight`` direct
  publishes are already waiting); the record is fsync'd in the spool and the drainer
  (``ingest/drain.py``) delivers it. The direct send that timed out may still complete later: that
  record then reaches the topic twice, with the same ``delivery_id`` (consumers are idempotent on it).
- ``Unavailable`` (raised): neither worked — the spool is full or unwritable and a last direct attempt
  failed too. The caller answers 503. (Durability beats order here: that last attempt goes around
  the spool.)

Order, per key (one Sentry issue): while the spool holds rows of a key (or appends of it are on their
way), that key's new records go to the spool as well, so a later event of an issue never overtakes a
spooled one; the drainer keeps spool order per key. Other keys go around a non-empty spool once Kafka
acknowledges direct sends again: after a direct send timed out or failed, one direct send at a time,
at most one every ``PROBE_INTERVAL`` seconds, probes Kafka (the rest spool at once) until one is
acknowledged. Rows whose keys this process does
not know (an earlier run's, a dead worker's) hold every key back until the spool is empty
(``AsyncSpool.may_hold``).

``Publisher`` also owns the lifecycle: ``start`` launches the producer supervisor
(``ingest/producer.py``) and the drainer; ``close`` stops draining, flushes the producer and
releases the spool with its unsent rows still in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import StrEnum

from ingest.async_spool import AsyncSpool
from ingest.drain import Drainer
from ingest.producer import ProducerSupervisor
from ingest.record import RawRecord
from ingest.spool_files import SpoolError
from shared import metrics
from shared.producer import ProducerFactory, retrieve

log = logging.getLogger("blametrail.ingest.publish")


PROBE_INTERVAL = 1.0  # seconds between direct sends that probe an unhealthy Kafka around the spool


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    SPOOLED = "spooled"


class Unavailable(Exception):
    """Neither Kafka nor the spool could make the webhook durable: answer 503 with Retry-After."""


class Publisher:
    """Publishes to ``topic`` (the raw topic) directly or through ``spool``; see the module docstring."""

    def __init__(
        self,
        spool: AsyncSpool,
        factory: ProducerFactory,
        *,
        topic: str,
        publish_timeout: float,
        max_inflight: int,
        bootstrap: str,
    ) -> None:
        self.spool = spool
        self._topic = topic
        self._timeout = publish_timeout
        self._max_inflight = max_inflight
        self._inflight = 0
        self._healthy = True  # the last direct send was acknowledged (not timed out, not failed)
        self._failed_at = -PROBE_INTERVAL  # when a direct send last timed out or failed (monotonic)
        self._probing = False  # a direct send around a non-empty spool is testing an unhealthy Kafka
        self.producers = ProducerSupervisor(factory, bootstrap=bootstrap, busy=self._busy, on_connected=self._wake)
        self._drainer = Drainer(spool, self.producers, topic)

    @property
    def producer_connected(self) -> bool:
        return self.producers.producer is not None

    @property
    def spool_writable(self) -> bool:
        return self.spool.writable

    def _busy(self) -> bool:
        return self.spool.depth > 0 or self._inflight > 0

    def _wake(self) -> None:
        self._drainer.wake()

    def _direct_allowed(self, key: bytes) -> bool:
        if self.producers.usable is None or self._inflight >= self._max_inflight:
            return False
        if self.spool.empty:
            return True
        if self.spool.may_hold(key):
            return False
        return self._healthy or (not self._probing and time.monotonic() - self._failed_at >= PROBE_INTERVAL)

    async def start(self, wait_connected: float = 5.0) -> None:
        """Start the producer supervisor and the drainer; wait for the first producer start attempt, at
        most ``wait_connected`` seconds (ingest serves from the spool if Kafka is not there)."""
        self._drainer.start()
        await self.producers.start(wait_connected)

    async def close(self, grace: float = 2.0) -> None:
        """Stop draining, flush the producer, release the spool. Bounded by about ``2 * grace``.

        Spooled rows not yet acknowledged stay in the spool file for the next start.
        """
        self.producers.stop()
        kafka_answers = await self._drainer.stop(grace)
        await self.producers.close(grace, flush=kafka_answers)
        await self.spool.close()

    async def publish(self, record: RawRecord) -> Outcome:
        """Make ``record`` durable; raises ``Unavailable`` when neither Kafka nor the spool can."""
        tried_direct = False
        if self._direct_allowed(record.key):
            tried_direct = True
            probe = not self._healthy
            self._probing = self._probing or probe
            try:
                if await self._send_direct(record):
                    return Outcome.ACCEPTED
            finally:
                if probe:
                    self._probing = False
        try:
            await self._to_spool(record)
        except SpoolError as exc:
            # Durability beats order: a last direct attempt rather than losing the webhook.
            if not tried_direct and await self._send_direct(record):
                log.warning("spool refused a webhook (%s): published directly, out of spool order", exc)
                return Outcome.ACCEPTED
            raise Unavailable(str(exc)) from exc
        return Outcome.SPOOLED

    async def _send_direct(self, record: RawRecord) -> bool:
        producer = self.producers.producer
        if producer is None:
            return False
        if self._inflight == 0:
            self.producers.progress()
        self._inflight += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                future = await producer.send(
                    self._topic,
                    value=record.value,
                    key=record.key,
                    timestamp_ms=record.timestamp_ms,
                    headers=list(record.headers),
                )
                future.add_done_callback(retrieve)
                await asyncio.shield(future)
        except TimeoutError:
            self._healthy, self._failed_at = False, time.monotonic()
            return False
        except Exception as exc:
            self._healthy, self._failed_at = False, time.monotonic()
            self.producers.check_error(producer, exc)
            return False
        finally:
            self._inflight -= 1
        self._healthy = True
        metrics.INGEST_PUBLISH_SECONDS.observe(time.perf_counter() - started)
        self.producers.progress()
        return True

    async def _to_spool(self, record: RawRecord) -> None:
        await self.spool.append(record)
        self._drainer.wake()
