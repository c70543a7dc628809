"""The local durable spool: webhooks Kafka did not acknowledge in time, kept on disk until it does.

One SQLite file per process (format and ownership in ``ingest/spool_files.py``): an append returns only
after its transaction is fsync'd, so a webhook answered "spooled" survives a crash of the process or
the host. At start a process takes over one orphan file as its own (a restarted single worker finds its
spool again) and merges the rows of any other orphan into it, oldest first; ``adopt_orphans`` repeats
the merge later for workers that died meanwhile. A merge commits each chunk here before deleting it
there: a crash in between duplicates rows (harmless downstream), never loses them.

A spool serves one topic, the raw topic it was opened for; rows keep their append order (SQLite
rowid). Rows an adopted file holds for another topic (written by a process with another topic prefix)
are parked, not sent: see ``park``. The size limit counts payload bytes (key, value, headers and a
small per-row overhead), not the file size.

``Spool`` is synchronous and single-threaded; ``ingest/async_spool.py`` drives it from asyncio.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from ingest.record import Headers, RawRecord
from ingest.spool_files import (
    COLUMNS,
    SpoolUnavailable,
    claim,
    connect,
    fsync_dir,
    lock_orphans,
    remove_files,
    set_aside,
)

log = logging.getLogger("blametrail.ingest.spool")

MERGE_CHUNK = 500


@dataclass(frozen=True, slots=True)
class SpoolRow:
    """A spooled record and its position in the spool (increasing in append order)."""

    id: int
    record: RawRecord


@dataclass(frozen=True)
class SpoolStats:
    """A snapshot of the spool's counters."""

    depth: int
    bytes: int
    oldest_received_at: float | None
    max_bytes: int


def _encode_headers(headers: Headers) -> bytes:
    # latin-1 maps every byte to one code point: lossless for arbitrary header bytes.
    return orjson.dumps([[k, v.decode("latin-1")] for k, v in headers])


def _decode_headers(blob: bytes) -> Headers:
    return tuple((str(k), str(v).encode("latin-1")) for k, v in orjson.loads(blob))


class Spool:
    """A process's spool file for ``topic``. Not thread-safe: call it from one thread at a time.

    ``append`` is durable when it returns; ``delete`` removes rows Kafka acknowledged. SQLite errors
    surface as ``SpoolUnavailable``; a message over the byte limit is refused, not an error.
    """

    def __init__(
        self, directory: Path, path: Path, lock_fd: int, conn: sqlite3.Connection, topic: str, max_bytes: int
    ) -> None:
        self.directory = directory
        self.path = path
        self.topic = topic
        self.max_bytes = max_bytes
        self._lock_fd = lock_fd
        self._conn: sqlite3.Connection | None = conn
        self._depth = 0
        self._bytes = 0
        self._oldest: float | None = None
        self._park_other_topics()
        self._load_counters()

    @classmethod
    def open(cls, directory: Path, topic: str, max_bytes: int) -> Spool:
        """Take over an orphan spool file in ``directory`` (or create one) and merge the other orphans.

        Raises ``SpoolUnavailable`` when the directory or the file cannot be used.
        """
        db, fd, conn, orphans = claim(directory)
        spool = cls(directory, db, fd, conn, topic, max_bytes)
        if spool.depth:
            log.warning("spool %s holds %d webhooks from an earlier run: draining them first", db, spool.depth)
        for orphan, orphan_fd in orphans:
            spool._merge(orphan, orphan_fd)
        return spool

    # --- counters -----------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SpoolUnavailable("the spool is closed")
        return self._conn

    def _load_counters(self) -> None:
        count, size = self._db().execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool").fetchone()
        self._depth, self._bytes = int(count), int(size)
        self._refresh_oldest()

    def _refresh_oldest(self) -> None:
        row = self._db().execute("SELECT received_at FROM spool ORDER BY id LIMIT 1").fetchone()
        self._oldest = float(row[0]) if row else None

    def stats(self) -> SpoolStats:
        return SpoolStats(self._depth, self._bytes, self._oldest, self.max_bytes)

    @property
    def depth(self) -> int:
        """Rows waiting to be delivered."""
        return self._depth

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

    def append(self, records: Sequence[RawRecord]) -> list[bool]:
        """Store ``records`` in order, in one fsync'd transaction.

        Returns, per record, whether it was stored (False: it would exceed the byte limit).
        Raises ``SpoolUnavailable`` when nothing could be stored.
        """
        accepted: list[bool] = []
        rows: list[tuple[str, bytes, bytes, bytes, float, int]] = []
        budget = self.max_bytes - self._bytes
        for m in records:
            size = m.size
            if size > budget:
                accepted.append(False)
                continue
            budget -= size
            accepted.append(True)
            rows.append((self.topic, m.key, m.value, _encode_headers(m.headers), m.received_at, size))
        if rows:
            self._write(lambda conn: conn.executemany(f"INSERT INTO spool ({COLUMNS}) VALUES (?,?,?,?,?,?)", rows))
            self._depth += len(rows)
            self._bytes += sum(row[-1] for row in rows)
            if self._oldest is None:
                self._refresh_oldest()
        return accepted

    def peek(self, limit: int, max_bytes: int) -> list[SpoolRow]:
        """The oldest rows in append order: at most ``limit`` rows and, past the first row, at most
        ``max_bytes`` bytes."""
        cursor = self._db().execute(
            "SELECT id, key, value, headers, received_at, size FROM spool ORDER BY id LIMIT ?", (limit,)
        )
        out: list[SpoolRow] = []
        total = 0
        for row_id, key, value, headers, received_at, size in cursor:
            if out and total + size > max_bytes:
                break
            total += size
            record = RawRecord(bytes(key), bytes(value), _decode_headers(headers), float(received_at))
            out.append(SpoolRow(int(row_id), record))
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
                _park(conn, "id = ?", (r.id,), now, reason)

        self._write(work)
        self._forget(rows)

    def _park_other_topics(self) -> None:
        """Park the rows of a taken-over or merged file that were spooled for another topic."""
        if self._db().execute("SELECT 1 FROM spool WHERE topic != ? LIMIT 1", (self.topic,)).fetchone() is None:
            return
        reason = f"spooled for another topic than {self.topic} (another BLAMETRAIL_TOPIC_PREFIX)"
        self._write(lambda conn: _park(conn, "topic != ?", (self.topic,), time.time(), reason))
        log.error("spool %s held webhooks for another topic than %s: parked for an operator", self.path, self.topic)
        self._load_counters()

    def _forget(self, rows: Sequence[SpoolRow]) -> None:
        self._depth = max(self._depth - len(rows), 0)
        self._bytes = max(self._bytes - sum(r.record.size for r in rows), 0)
        self._refresh_oldest()
        if not self._depth:
            self._bytes = 0
            with contextlib.suppress(sqlite3.Error):
                self._db().execute("PRAGMA incremental_vacuum")

    def adopt_orphans(self) -> int:
        """Merge the rows of every unlocked spool file in the directory into this one; returns how many."""
        adopted = 0
        for db, fd in lock_orphans(self.directory, skip=self.path):
            adopted += self._merge(db, fd)
        return adopted

    def _merge(self, db: Path, fd: int) -> int:
        """Copy an orphan's rows (oldest first) to the end of this spool, then delete the orphan."""
        moved = 0
        try:
            src = connect(db)
        except (sqlite3.Error, SpoolUnavailable) as exc:
            set_aside(db, fd, exc)
            return 0
        try:
            for table in ("spool", "parked"):
                extra = ", parked_at, reason" if table == "parked" else ""
                while True:
                    rows = src.execute(
                        f"SELECT id, {COLUMNS}{extra} FROM {table} ORDER BY id LIMIT ?", (MERGE_CHUNK,)
                    ).fetchall()
                    if not rows:
                        break
                    values = [tuple(r[1:]) for r in rows]
                    insert = f"INSERT INTO {table} ({COLUMNS}{extra}) VALUES ({','.join('?' * len(values[0]))})"
                    self._write(functools.partial(_insert_many, insert, values))
                    src.execute("BEGIN IMMEDIATE")
                    src.execute(f"DELETE FROM {table} WHERE id <= ?", (rows[-1][0],))
                    src.execute("COMMIT")
                    if table == "spool":
                        moved += len(rows)
                        self._depth += len(rows)
                        self._bytes += sum(int(r[6]) for r in rows)
            src.close()
            remove_files(db)
            fsync_dir(self.directory)
        except sqlite3.Error as exc:
            src.close()
            raise SpoolUnavailable(f"merging orphan spool {db} failed: {exc}") from exc
        finally:
            os.close(fd)
        self._park_other_topics()
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
                remove_files(self.path)
        finally:
            os.close(self._lock_fd)


def _park(conn: sqlite3.Connection, where: str, params: tuple[object, ...], now: float, reason: str) -> None:
    """Move the ``spool`` rows matching ``where`` to ``parked``, oldest first."""
    select = f"SELECT {COLUMNS}, ?, ? FROM spool WHERE {where} ORDER BY id"
    conn.execute(f"INSERT INTO parked ({COLUMNS}, parked_at, reason) {select}", (now, reason[:1000], *params))
    conn.execute(f"DELETE FROM spool WHERE {where}", params)


def _insert_many(statement: str, values: list[tuple[object, ...]], conn: sqlite3.Connection) -> None:
    conn.executemany(statement, values)
