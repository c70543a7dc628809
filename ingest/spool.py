"""The local durable spool: webhooks Kafka did not acknowledge in time, kept on disk until it does.

One SQLite file per process, in WAL mode with ``synchronous=FULL``: an append returns only after its
transaction is fsync'd, so a webhook answered "spooled" survives a crash of the process or the host.
A process owns its file exclusively through an ``flock`` on a sidecar ``.lock`` file; a file whose lock
nobody holds belongs to a process that is gone (an orphan). At start a process takes over one orphan as
its own file (a restarted single worker finds its spool again) and merges the rows of any other orphan
into it, oldest first; ``adopt_orphans`` repeats the merge later for workers that died meanwhile.

Rows keep their append order (SQLite rowid) per Kafka topic. The size limit counts payload bytes (key,
value, headers and a small per-row overhead), not the file size.

``Spool`` is synchronous and single-threaded; ``AsyncSpool`` drives it from asyncio on one dedicated
thread and group-commits concurrent appends into one transaction (one fsync).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import orjson

from shared import metrics

log = logging.getLogger("blametrail.ingest.spool")

SUFFIX = ".spool"
LOCK_SUFFIX = ".lock"
ROW_OVERHEAD = 64
MERGE_CHUNK = 500

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    headers BLOB NOT NULL,
    received_at REAL NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS spool_topic ON spool (topic, id);
CREATE TABLE IF NOT EXISTS parked (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    headers BLOB NOT NULL,
    received_at REAL NOT NULL,
    size INTEGER NOT NULL,
    parked_at REAL NOT NULL,
    reason TEXT NOT NULL
);
"""
_COLUMNS = "topic, key, value, headers, received_at, size"

Headers = tuple[tuple[str, bytes], ...]


class SpoolError(Exception):
    """The spool cannot take a message."""


class SpoolFull(SpoolError):
    """Taking the message would exceed the spool's byte limit."""


class SpoolUnavailable(SpoolError):
    """The spool file cannot be written (disk full, I/O error, closed...)."""


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    """One Kafka record as ingest would produce it, plus when the webhook arrived (Unix seconds)."""

    topic: str
    key: bytes
    value: bytes
    headers: Headers
    received_at: float

    @property
    def size(self) -> int:
        return len(self.key) + len(self.value) + sum(len(k) + len(v) for k, v in self.headers) + ROW_OVERHEAD

    @property
    def timestamp_ms(self) -> int:
        return int(self.received_at * 1000)


@dataclass(frozen=True, slots=True)
class SpoolRow:
    """A spooled message and its position in the spool (increasing in append order)."""

    id: int
    message: SpooledMessage


@dataclass(frozen=True)
class SpoolStats:
    """A snapshot of the spool's counters."""

    depth: Mapping[str, int] = field(default_factory=dict)
    bytes: int = 0
    oldest_received_at: float | None = None
    max_bytes: int = 0

    @property
    def total_depth(self) -> int:
        return sum(self.depth.values())


def _encode_headers(headers: Headers) -> bytes:
    # latin-1 maps every byte to one code point: lossless for arbitrary header bytes.
    return orjson.dumps([[k, v.decode("latin-1")] for k, v in headers])


def _decode_headers(blob: bytes) -> Headers:
    return tuple((str(k), str(v).encode("latin-1")) for k, v in orjson.loads(blob))


def _try_lock(lock_path: Path) -> int | None:
    """An fd holding an exclusive flock on ``lock_path``, or None when another process holds it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # An adopter may have unlinked the lock file between our open and our flock: then we hold a
    # lock on a file nobody else can see, which proves nothing.
    try:
        same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


def _insert_many(statement: str, values: list[tuple[object, ...]], conn: sqlite3.Connection) -> None:
    conn.executemany(statement, values)


def _lock_path(db: Path) -> Path:
    return db.with_name(db.name + LOCK_SUFFIX)


def _remove_files(db: Path) -> None:
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), _lock_path(db)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect on a new file
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolUnavailable(f"{path}: SQLite refused WAL mode ({mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA journal_size_limit=67108864")
        conn.executescript(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


class Spool:
    """A process's spool file. Not thread-safe: call it from one thread at a time.

    ``append`` is durable when it returns; ``delete`` removes rows Kafka acknowledged. SQLite errors
    surface as ``SpoolUnavailable``; a message over the byte limit is refused, not an error.
    """

    def __init__(self, directory: Path, path: Path, lock_fd: int, conn: sqlite3.Connection, max_bytes: int) -> None:
        self.directory = directory
        self.path = path
        self.max_bytes = max_bytes
        self._lock_fd = lock_fd
        self._conn: sqlite3.Connection | None = conn
        self._depth: dict[str, int] = {}
        self._bytes = 0
        self._oldest: float | None = None
        self._load_counters()

    @classmethod
    def open(cls, directory: Path, max_bytes: int) -> Spool:
        """Take over an orphan spool file in ``directory`` (or create one) and merge the other orphans.

        Raises ``SpoolUnavailable`` when the directory or the file cannot be used.
        """
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            own: tuple[Path, int, sqlite3.Connection] | None = None
            orphans: list[tuple[Path, int]] = []
            for db, fd in list(_lock_orphans(directory)):
                if own is not None:
                    orphans.append((db, fd))
                    continue
                try:
                    own = (db, fd, _connect(db))
                except (sqlite3.Error, SpoolUnavailable) as exc:
                    _set_aside(db, fd, exc)
            if own is None:
                new = directory / f"ingest-{uuid.uuid4().hex}{SUFFIX}"
                new_fd = _try_lock(_lock_path(new))
                if new_fd is None:  # pragma: no cover - a fresh random name cannot be locked already
                    raise SpoolUnavailable(f"cannot lock new spool file {new}")
                try:
                    own = (new, new_fd, _connect(new))
                except BaseException:
                    os.close(new_fd)
                    raise
            _fsync_dir(directory)
        except (OSError, sqlite3.Error) as exc:
            raise SpoolUnavailable(f"spool directory {directory} is not usable: {exc}") from exc
        db, fd, conn = own
        spool = cls(directory, db, fd, conn, max_bytes)
        if spool.total_depth:
            log.warning("spool %s holds %d webhooks from an earlier run: draining them first", db, spool.total_depth)
        for orphan, orphan_fd in orphans:
            spool._merge(orphan, orphan_fd)
        return spool

    # --- counters -----------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SpoolUnavailable("the spool is closed")
        return self._conn

    def _load_counters(self) -> None:
        rows = self._db().execute("SELECT topic, COUNT(*), COALESCE(SUM(size), 0) FROM spool GROUP BY topic")
        self._depth = {str(topic): int(count) for topic, count, _ in rows.fetchall() if count}
        self._bytes = int(self._db().execute("SELECT COALESCE(SUM(size), 0) FROM spool").fetchone()[0])
        self._refresh_oldest()

    def _refresh_oldest(self) -> None:
        row = self._db().execute("SELECT received_at FROM spool ORDER BY id LIMIT 1").fetchone()
        self._oldest = float(row[0]) if row else None

    def stats(self) -> SpoolStats:
        return SpoolStats(dict(self._depth), self._bytes, self._oldest, self.max_bytes)

    @property
    def total_depth(self) -> int:
        return sum(self._depth.values())

    def depth(self, topic: str) -> int:
        return self._depth.get(topic, 0)

    @property
    def bytes(self) -> int:
        return self._bytes

    # --- operations ---------------------------------------------------------------------------

    def _write(self, work: Callable[[sqlite3.Connection], object]) -> None:
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
            work(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise SpoolUnavailable(f"spool {self.path} cannot be written: {exc}") from exc

    def append(self, messages: Sequence[SpooledMessage]) -> list[bool]:
        """Store ``messages`` in order, in one fsync'd transaction.

        Returns, per message, whether it was stored (False: it would exceed the byte limit).
        Raises ``SpoolUnavailable`` when nothing could be stored.
        """
        accepted: list[bool] = []
        rows: list[tuple[str, bytes, bytes, bytes, float, int]] = []
        budget = self.max_bytes - self._bytes
        for m in messages:
            size = m.size
            if size > budget:
                accepted.append(False)
                continue
            budget -= size
            accepted.append(True)
            rows.append((m.topic, m.key, m.value, _encode_headers(m.headers), m.received_at, size))
        if rows:
            self._write(lambda conn: conn.executemany(f"INSERT INTO spool ({_COLUMNS}) VALUES (?,?,?,?,?,?)", rows))
            for topic, *_, size in rows:
                self._depth[topic] = self._depth.get(topic, 0) + 1
                self._bytes += size
            if self._oldest is None:
                self._refresh_oldest()
        return accepted

    def peek(self, topic: str, limit: int, max_bytes: int) -> list[SpoolRow]:
        """The oldest rows of ``topic`` in append order: at most ``limit`` rows and, past the first
        row, at most ``max_bytes`` bytes."""
        cursor = self._db().execute(
            "SELECT id, key, value, headers, received_at, size FROM spool WHERE topic = ? ORDER BY id LIMIT ?",
            (topic, limit),
        )
        out: list[SpoolRow] = []
        total = 0
        for row_id, key, value, headers, received_at, size in cursor:
            if out and total + size > max_bytes:
                break
            total += size
            message = SpooledMessage(topic, bytes(key), bytes(value), _decode_headers(headers), float(received_at))
            out.append(SpoolRow(int(row_id), message))
        cursor.close()
        return out

    def delete(self, rows: Sequence[SpoolRow]) -> None:
        """Remove rows (Kafka acknowledged them). Durable when it returns."""
        if not rows:
            return
        ids = [(r.id,) for r in rows]
        self._write(lambda conn: conn.executemany("DELETE FROM spool WHERE id = ?", ids))
        self._forget(rows)

    def park(self, rows: Sequence[SpoolRow], reason: str) -> None:
        """Move rows Kafka refuses for good (e.g. too large for the topic) out of the queue into the
        ``parked`` table of the same file, where an operator can inspect them; they are never dropped."""
        if not rows:
            return
        now = time.time()

        def work(conn: sqlite3.Connection) -> None:
            for r in rows:
                m = r.message
                conn.execute(
                    f"INSERT INTO parked ({_COLUMNS}, parked_at, reason) VALUES (?,?,?,?,?,?,?,?)",
                    (m.topic, m.key, m.value, _encode_headers(m.headers), m.received_at, m.size, now, reason[:1000]),
                )
                conn.execute("DELETE FROM spool WHERE id = ?", (r.id,))

        self._write(work)
        self._forget(rows)

    def _forget(self, rows: Sequence[SpoolRow]) -> None:
        for r in rows:
            topic = r.message.topic
            left = self._depth.get(topic, 0) - 1
            if left > 0:
                self._depth[topic] = left
            else:
                self._depth.pop(topic, None)
            self._bytes -= r.message.size
        self._bytes = max(self._bytes, 0)
        self._refresh_oldest()
        if not self._depth:
            self._bytes = 0
            with contextlib.suppress(sqlite3.Error):
                self._db().execute("PRAGMA incremental_vacuum")

    def adopt_orphans(self) -> int:
        """Merge the rows of every unlocked spool file in the directory into this one; returns how many."""
        adopted = 0
        for db, fd in _lock_orphans(self.directory, skip=self.path):
            adopted += self._merge(db, fd)
        return adopted

    def _merge(self, db: Path, fd: int) -> int:
        """Copy an orphan's rows (oldest first) to the end of this spool, then delete the orphan.

        Each chunk is committed here before it is deleted there: a crash in between repeats the
        chunk (duplicates, harmless downstream), never loses it.
        """
        moved = 0
        try:
            src = _connect(db)
        except (sqlite3.Error, SpoolUnavailable) as exc:
            _set_aside(db, fd, exc)
            return 0
        try:
            for table in ("spool", "parked"):
                extra = ", parked_at, reason" if table == "parked" else ""
                while True:
                    rows = src.execute(
                        f"SELECT id, {_COLUMNS}{extra} FROM {table} ORDER BY id LIMIT ?", (MERGE_CHUNK,)
                    ).fetchall()
                    if not rows:
                        break
                    values = [tuple(r[1:]) for r in rows]
                    insert = f"INSERT INTO {table} ({_COLUMNS}{extra}) VALUES ({','.join('?' * len(values[0]))})"
                    self._write(functools.partial(_insert_many, insert, values))
                    src.execute("BEGIN IMMEDIATE")
                    src.execute(f"DELETE FROM {table} WHERE id <= ?", (rows[-1][0],))
                    src.execute("COMMIT")
                    if table == "spool":
                        moved += len(rows)
                        for r in rows:
                            self._depth[r[1]] = self._depth.get(r[1], 0) + 1
                            self._bytes += int(r[6])
            src.close()
            _remove_files(db)
            _fsync_dir(self.directory)
        except sqlite3.Error as exc:
            src.close()
            raise SpoolUnavailable(f"merging orphan spool {db} failed: {exc}") from exc
        finally:
            os.close(fd)
        self._refresh_oldest()
        if moved:
            log.warning("adopted %d webhooks from orphan spool %s", moved, db)
        return moved

    def close(self) -> None:
        """Checkpoint and release the file; an empty spool file is removed, a non-empty one stays
        for the next process (which takes it over at start)."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        empty = not self._depth
        try:
            if empty:
                empty = conn.execute("SELECT COUNT(*) FROM parked").fetchone()[0] == 0
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            if empty:
                _remove_files(self.path)
        finally:
            os.close(self._lock_fd)


def _lock_orphans(directory: Path, skip: Path | None = None) -> Iterable[tuple[Path, int]]:
    """Spool files in ``directory`` nobody holds, oldest first, each with our lock on it."""

    def age(path: Path) -> tuple[float, str]:
        try:
            return (path.stat().st_mtime, path.name)
        except FileNotFoundError:
            return (float("inf"), path.name)

    for db in sorted(directory.glob("*" + SUFFIX), key=age):
        if skip is not None and db == skip:
            continue
        fd = _try_lock(_lock_path(db))
        if fd is None:
            continue
        if not db.exists():  # adopted and removed by another process meanwhile
            with contextlib.suppress(FileNotFoundError):
                _lock_path(db).unlink()
            os.close(fd)
            continue
        yield db, fd


def _set_aside(db: Path, fd: int, error: Exception) -> None:
    """Rename an unreadable spool file out of the way (kept for an operator) and release its lock."""
    broken = db.with_name(f"{db.name}.broken-{int(time.time())}")
    log.error("spool file %s cannot be read (%s): kept as %s for an operator", db, error, broken)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            db.with_name(db.name + suffix).rename(broken.with_name(broken.name + suffix))
    with contextlib.suppress(OSError):
        _lock_path(db).unlink()
    os.close(fd)


def spooled_rows(directory: Path) -> int:
    """Rows waiting in every spool file of ``directory``, read-only (for operators and tests)."""
    total = 0
    for db in directory.glob("*" + SUFFIX):
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            total += int(conn.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
        finally:
            conn.close()
    return total


class AsyncSpool:
    """A ``Spool`` driven from asyncio: every operation runs on one dedicated thread, in call order.

    Appends made while a write is in progress are group-committed in the next transaction (one
    fsync for all of them), in the order ``append`` was called. Counters are snapshots taken on the
    spool thread after each operation. ``append`` raises ``SpoolFull`` or ``SpoolUnavailable``.
    """

    def __init__(self, spool: Spool, executor: ThreadPoolExecutor, headroom: int = 0) -> None:
        self._spool = spool
        self._headroom = headroom
        self._executor = executor
        self._queue: list[tuple[SpooledMessage, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._stats = spool.stats()
        self._failed = False
        self._closed = False
        self._publish_metrics()
        metrics.INGEST_SPOOL_OLDEST_AGE.set_function(self._oldest_age)

    @classmethod
    async def open(cls, directory: Path, max_bytes: int, headroom: int = 0) -> AsyncSpool:
        """Open the process's spool (``Spool.open``) on its own thread. ``writable`` needs at least
        ``headroom`` free bytes (ingest passes its body limit)."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-spool")
        try:
            spool = await asyncio.get_running_loop().run_in_executor(executor, Spool.open, directory, max_bytes)
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

    def depth(self, topic: str) -> int:
        return self._stats.depth.get(topic, 0)

    @property
    def total_depth(self) -> int:
        return self._stats.total_depth

    @property
    def writable(self) -> bool:
        """The last write succeeded and at least ``headroom`` bytes (and one byte) are free."""
        free = self._stats.max_bytes - self._stats.bytes
        return not self._closed and not self._failed and free >= max(self._headroom, 1)

    def _oldest_age(self) -> float:
        oldest = self._stats.oldest_received_at
        return max(0.0, time.time() - oldest) if oldest is not None else 0.0

    def _publish_metrics(self) -> None:
        metrics.INGEST_SPOOL_DEPTH.set(self._stats.total_depth)
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

    async def append(self, message: SpooledMessage) -> None:
        """Durably store ``message``; returns once it is fsync'd."""
        if self._closed:
            raise SpoolUnavailable("the spool is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((message, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="spool-flush")
        await future

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

    async def peek(self, topic: str, limit: int, max_bytes: int) -> list[SpoolRow]:
        return await self._run(functools.partial(self._spool.peek, topic, limit, max_bytes))

    async def delete(self, rows: Sequence[SpoolRow]) -> None:
        await self._run(functools.partial(self._spool.delete, rows))

    async def park(self, rows: Sequence[SpoolRow], reason: str) -> None:
        await self._run(functools.partial(self._spool.park, rows, reason))

    async def adopt_orphans(self) -> int:
        return await self._run(self._spool.adopt_orphans)

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
