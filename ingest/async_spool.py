"""The spool driven from asyncio: every operation on one dedicated thread, appends group-committed.

Appends made while a write is in progress are committed together in the next transaction (one fsync
for all of them), in the order ``append`` was called; each ``append`` returns once its record is
fsync'd, or raises ``SpoolFull`` (over the byte limit) or ``SpoolUnavailable`` (cannot write, closed).
The event loop never waits for the disk. Counters are snapshots taken on the spool thread after each
operation and published as ``blametrail_ingest_spool_depth``, ``_bytes`` and ``_oldest_age_seconds``.

``may_hold(key)`` says whether a row of ``key`` may be in the spool (or on its way there): the keys
of the rows this process appended are counted until they are delivered or parked. Rows it did not
append (left by an earlier run, adopted from a dead worker) have keys it does not know: until the
spool is empty again, every key may be held. The publisher sends a webhook around a non-empty spool
only when its key is not held, so an issue's events stay in order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ingest.record import RawRecord
from ingest.spool import Spool, SpoolRow, SpoolStats
from ingest.spool_files import SpoolError, SpoolFull, SpoolUnavailable
from shared import metrics

T = TypeVar("T")


class AsyncSpool:
    """A ``Spool`` driven from asyncio; see the module docstring."""

    def __init__(self, spool: Spool, executor: ThreadPoolExecutor, headroom: int = 0) -> None:
        self._spool = spool
        self._headroom = headroom
        self._executor = executor
        self._queue: list[tuple[RawRecord, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._stats = spool.stats()
        self._failed = False
        self._closed = False
        self._keys: collections.Counter[bytes] = collections.Counter()  # appended, not yet delivered
        self._keys_known = self._stats.depth == 0
        self._publish_metrics()
        metrics.INGEST_SPOOL_OLDEST_AGE.set_function(self._oldest_age)

    @classmethod
    async def open(cls, directory: Path, topic: str, max_bytes: int, headroom: int = 0) -> AsyncSpool:
        """Open the process's spool for ``topic`` (``Spool.open``) on its own thread. ``writable`` needs
        at least ``headroom`` free bytes (ingest passes its body limit)."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-spool")
        try:
            loop = asyncio.get_running_loop()
            spool = await loop.run_in_executor(executor, Spool.open, directory, topic, max_bytes)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(spool, executor, headroom)

    @property
    def path(self) -> Path:
        return self._spool.path

    @property
    def stats(self) -> SpoolStats:
        return self._stats

    @property
    def depth(self) -> int:
        """Rows waiting to be delivered."""
        return self._stats.depth

    @property
    def writable(self) -> bool:
        """The last write succeeded and at least ``headroom`` bytes (and one byte) are free."""
        free = self._stats.max_bytes - self._stats.bytes
        return not self._closed and not self._failed and free >= max(self._headroom, 1)

    @property
    def empty(self) -> bool:
        """No row waiting, and no append queued or being written (a cancelled ``append`` may still be
        on its way)."""
        return self._stats.depth == 0 and not self._queue and self._flusher is None

    def may_hold(self, key: bytes) -> bool:
        """Whether a row of ``key`` may be in the spool or on its way there (see the module docstring)."""
        return not self._keys_known or self._keys[key] > 0

    def _forget(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            if self._keys[key] > 1:
                self._keys[key] -= 1
            else:
                self._keys.pop(key, None)
        if self.empty:
            # Empty, nothing on its way: from now on every row's key is one this process counts.
            self._keys.clear()
            self._keys_known = True

    def _oldest_age(self) -> float:
        oldest = self._stats.oldest_received_at
        return max(0.0, time.time() - oldest) if oldest is not None else 0.0

    def _publish_metrics(self) -> None:
        metrics.INGEST_SPOOL_DEPTH.set(self._stats.depth)
        metrics.INGEST_SPOOL_BYTES.set(self._stats.bytes)

    async def _run(self, work: Callable[[], T]) -> T:
        if self._closed:
            raise SpoolUnavailable("the spool is closed")

        def call() -> tuple[T, SpoolStats]:
            return work(), self._spool.stats()

        try:
            result, stats = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except SpoolUnavailable:
            self._failed = True
            self._stats = await asyncio.get_running_loop().run_in_executor(self._executor, self._spool.stats)
            self._publish_metrics()
            raise
        self._failed = False
        self._stats = stats
        self._publish_metrics()
        return result

    async def append(self, record: RawRecord) -> None:
        """Durably store ``record``; returns once it is fsync'd."""
        if self._closed:
            raise SpoolUnavailable("the spool is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((record, future))
        self._keys[record.key] += 1
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="spool-flush")
        try:
            await future
        except SpoolFull:
            self._forget([record.key])  # not stored
            raise
        except BaseException:
            self._forget([record.key])
            self._keys_known = False  # stored or not, nobody knows: every key may be held until empty
            raise

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    stored = await self._run(functools.partial(self._spool.append, [m for m, _ in batch]))
                except Exception as exc:
                    error = exc if isinstance(exc, SpoolError) else SpoolUnavailable(repr(exc))
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, future), ok in zip(batch, stored, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(None)
                    else:
                        future.set_exception(SpoolFull(f"spool is full ({self._stats.max_bytes} bytes)"))
        finally:
            self._flusher = None

    async def peek(self, limit: int, max_bytes: int) -> list[SpoolRow]:
        return await self._run(functools.partial(self._spool.peek, limit, max_bytes))

    async def delete(self, rows: Sequence[SpoolRow]) -> None:
        await self._run(functools.partial(self._spool.delete, rows))
        self._forget(row.record.key for row in rows)

    async def park(self, rows: Sequence[SpoolRow], reason: str) -> None:
        await self._run(functools.partial(self._spool.park, rows, reason))
        self._forget(row.record.key for row in rows)

    async def adopt_orphans(self) -> int:
        try:
            adopted = await self._run(self._spool.adopt_orphans)
        except BaseException:
            self._keys_known = False  # some of a dead worker's rows may have been merged before it failed
            raise
        if adopted:
            self._keys_known = False  # a dead worker's rows: keys this process never counted
        return adopted

    async def close(self) -> None:
        """Finish pending appends, then release the file (rows stay for the next start)."""
        if self._closed:
            return
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flusher)
        self._closed = True
        metrics.INGEST_SPOOL_OLDEST_AGE.set_function(lambda: 0.0)
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._spool.close)
        finally:
            self._executor.shutdown(wait=True)
