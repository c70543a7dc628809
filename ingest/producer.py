"""Producer supervision: one aiokafka producer at a time, created when Kafka is reachable, replaced when broken.

``ProducerSupervisor`` creates the producer in the background (ingest starts and serves from the spool
without Kafka; a failed start is retried every 0.2-2 s) and recreates it — counted in
``blametrail_ingest_producer_restarts_total`` — when

- a send fails with a fatal idempotence error (``shared.producer.FATAL_ERRORS``; aiokafka issue 1017:
  ``OutOfOrderSequenceNumber`` forever after a broker restart) or its sender task died
  (``check_error``, called by whoever sent);
- there is outstanding work (``busy``) but no acknowledgement (``progress``) for ``STUCK_AFTER`` seconds
  while the broker accepts TCP connections, continuously for ``STUCK_AFTER`` seconds (a broker that is
  simply down is waited for, not hammered with new producers).

A replaced producer is closed without waiting for its pending records (aiokafka would retry them
forever): ``retired`` is set for whoever waits on them (the drainer; its rows stay in the spool and are
sent again by the successor), and a direct send has its own deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from ingest.kafka import bootstrap_addresses
from shared import metrics
from shared.producer import START_TIMEOUT, Producer, ProducerFactory, dispose, is_broken, sender_alive

log = logging.getLogger("blametrail.ingest.producer")

STUCK_AFTER = 10.0


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; True when stopping."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


class ProducerSupervisor:
    """The current producer and its replacement; see the module docstring.

    ``busy`` says whether work waits for an acknowledgement; ``on_connected`` is called whenever a
    new producer is ready. ``start`` launches the supervisor and the watchdog; ``stop`` ends
    replacements; ``close`` flushes or disposes of the last producer.
    """

    def __init__(
        self, factory: ProducerFactory, *, bootstrap: str, busy: Callable[[], bool], on_connected: Callable[[], None]
    ) -> None:
        self._factory = factory
        self._bootstrap = bootstrap_addresses(bootstrap)
        self._busy = busy
        self._on_connected = on_connected
        self._producer: Producer | None = None
        self._producer_started = 0.0
        self._restart_reason = ""
        self._progress_at = time.monotonic()
        self._stop = asyncio.Event()
        self._restart = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self.retired = asyncio.Event()  # set when the current producer is replaced or shut down
        self._supervisor: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def producer(self) -> Producer | None:
        """The current producer (None while there is none)."""
        return self._producer

    @property
    def usable(self) -> Producer | None:
        """The current producer unless its replacement was requested."""
        return None if self._restart.is_set() else self._producer

    def progress(self) -> None:
        """Kafka acknowledged something (or nothing is waiting): the producer is not stuck."""
        self._progress_at = time.monotonic()

    def check_error(self, producer: Producer, exc: BaseException) -> None:
        """A send through ``producer`` failed with ``exc``: replace the producer if that means it is broken."""
        if is_broken(producer, exc):
            self.request_restart(producer, f"{type(exc).__name__}: {exc}")

    def request_restart(self, producer: Producer | None, reason: str) -> None:
        """Ask the supervisor to replace ``producer`` (ignored if it was replaced already)."""
        if producer is None or producer is not self._producer or self._restart.is_set():
            return
        self._restart_reason = reason
        self._restart.set()

    async def start(self, wait_connected: float) -> None:
        """Start supervising; wait for the first start attempt of a producer at most ``wait_connected`` s."""
        self._supervisor = asyncio.create_task(self._supervise(), name="ingest-producer")
        self._watchdog = asyncio.create_task(self._watch(), name="ingest-watchdog")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), wait_connected)

    def stop(self) -> None:
        """No more replacements: the current producer stays until ``close``."""
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def close(self, grace: float, flush: bool) -> None:
        """Stop, then flush (``flush``: Kafka answers) and stop the producer, or dispose of it.

        Each step is bounded by ``grace`` seconds.
        """
        self.stop()
        if self._supervisor is not None:  # it may be inside a producer start() that hangs
            done, _ = await asyncio.wait([self._supervisor], timeout=grace)
            if not done:
                self._supervisor.cancel()
        for task in (self._supervisor, self._watchdog):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        producer, self._producer = self._producer, None
        if producer is not None and not flush:
            await dispose(producer, grace)
        elif producer is not None:
            try:
                await asyncio.wait_for(producer.flush(), grace)
            except Exception as exc:
                log.warning("Kafka producer did not flush within %.0fs (%r): its records are spooled", grace, exc)
                await dispose(producer, grace)
            else:
                try:  # nothing left to deliver: a clean stop, unless that hangs
                    await asyncio.wait_for(producer.stop(), grace)
                except Exception as exc:
                    log.warning("Kafka producer did not stop cleanly (%r): closing it", exc)
                    await dispose(producer, grace)
        if self._closing:
            await asyncio.wait(self._closing, timeout=grace)

    def _retire(self, producer: Producer) -> None:
        """Dispose of ``producer`` in the background (nothing waits for its records any more)."""
        task = asyncio.create_task(dispose(producer, START_TIMEOUT))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _supervise(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                producer = self._factory()
            except Exception:
                log.exception("cannot create a Kafka producer")
                if await sleep_unless(self._stop, 5.0):
                    return
                continue
            try:
                await asyncio.wait_for(producer.start(), START_TIMEOUT)
            except asyncio.CancelledError:
                await dispose(producer, 1.0)
                raise
            except Exception as exc:
                self._first_attempt.set()
                log.warning("Kafka producer cannot start (%r): spooling; next try in %.1fs", exc, backoff)
                self._retire(producer)
                if await sleep_unless(self._stop, backoff):
                    return
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.2
            self.retired = asyncio.Event()
            self._producer = producer
            self._producer_started = time.monotonic()
            self._restart.clear()
            self._first_attempt.set()
            self._on_connected()
            log.info("Kafka producer connected")
            stop = asyncio.create_task(self._stop.wait())
            restart = asyncio.create_task(self._restart.wait())
            try:
                await asyncio.wait([stop, restart], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                restart.cancel()
            if self._stop.is_set():
                return  # close() flushes and stops the current producer
            self._producer = None
            self.retired.set()
            metrics.INGEST_PRODUCER_RESTARTS.inc()
            log.warning("recreating the Kafka producer: %s", self._restart_reason)
            self._retire(producer)

    async def _watch(self) -> None:
        """Restart a producer that makes no progress while the broker accepts connections."""
        reachable_since: float | None = None
        while not await sleep_unless(self._stop, 1.0):
            producer = self._producer
            if producer is None:
                reachable_since = None
                continue
            if not sender_alive(producer):
                self.request_restart(producer, "its sender task died")
                continue
            now = time.monotonic()
            outstanding = self._busy()
            if not outstanding:
                self.progress()
            if not outstanding or now - self._progress_at < STUCK_AFTER:
                reachable_since = None
                continue
            if not await self._broker_reachable():
                reachable_since = None
                continue
            reachable_since = reachable_since or now
            if now - reachable_since >= STUCK_AFTER and now - self._producer_started >= STUCK_AFTER:
                self.request_restart(
                    producer, f"no acknowledgement for {now - self._progress_at:.0f}s while Kafka is up"
                )
                reachable_since = None

    async def _broker_reachable(self) -> bool:
        for host, port in self._bootstrap:
            try:
                async with asyncio.timeout(1.0):
                    _, writer = await asyncio.open_connection(host, port)
            except (OSError, TimeoutError):
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        return False
