"""Spool files on disk: their SQLite format, who owns which file, orphans, unreadable files.

A spool file is an SQLite database ``ingest-<uuid>.spool`` in WAL mode with ``synchronous=FULL`` (a
committed transaction is fsync'd). A process owns a file while it holds an exclusive ``flock`` on the
sidecar ``<file>.lock``; a file whose lock nobody holds belongs to a process that is gone: an orphan.
``lock_orphans`` yields the orphans of a directory, oldest first, each already locked by the caller.
A file SQLite cannot open is renamed ``*.broken-<time>`` and left for an operator (``set_aside``).
Only ``fcntl.flock`` is used: the directory must be on a local filesystem.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("blametrail.ingest.spool")

SUFFIX = ".spool"
LOCK_SUFFIX = ".lock"

# ``topic`` is kept per row so that a file written by a process with another topic prefix is
# recognised (its rows are parked, see ``Spool``), and for files written by earlier versions.
SCHEMA = """
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
COLUMNS = "topic, key, value, headers, received_at, size"


class SpoolError(Exception):
    """The spool cannot take a message."""


class SpoolFull(SpoolError):
    """Taking the message would exceed the spool's byte limit."""


class SpoolUnavailable(SpoolError):
    """The spool file cannot be written (disk full, I/O error, closed...)."""


def connect(path: Path) -> sqlite3.Connection:
    """Open (or create) a spool file in WAL mode with ``synchronous=FULL``."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect on a new file
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolUnavailable(f"{path}: SQLite refused WAL mode ({mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA journal_size_limit=67108864")
        conn.executescript(SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def lock_path(db: Path) -> Path:
    return db.with_name(db.name + LOCK_SUFFIX)


def try_lock(lock: Path) -> int | None:
    """An fd holding an exclusive flock on ``lock``, or None when another process holds it."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # An adopter may have unlinked the lock file between our open and our flock: then we hold a
    # lock on a file nobody else can see, which proves nothing.
    try:
        same = os.fstat(fd).st_ino == os.stat(lock).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


def remove_files(db: Path) -> None:
    """Delete a spool file with its WAL, shared memory and lock files."""
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), lock_path(db)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_orphans(directory: Path, skip: Path | None = None) -> Iterable[tuple[Path, int]]:
    """Spool files in ``directory`` nobody holds, oldest first, each with our lock on it."""

    def age(path: Path) -> tuple[float, str]:
        try:
            return (path.stat().st_mtime, path.name)
        except FileNotFoundError:
            return (float("inf"), path.name)

    for db in sorted(directory.glob("*" + SUFFIX), key=age):
        if skip is not None and db == skip:
            continue
        fd = try_lock(lock_path(db))
        if fd is None:
            continue
        if not db.exists():  # adopted and removed by another process meanwhile
            with contextlib.suppress(FileNotFoundError):
                lock_path(db).unlink()
            os.close(fd)
            continue
        yield db, fd


def claim(directory: Path) -> tuple[Path, int, sqlite3.Connection, list[tuple[Path, int]]]:
    """The file this process takes as its own, locked and open (the oldest readable orphan, else a
    new file), and the other orphans, locked, for the caller to merge.

    Raises ``SpoolUnavailable`` when the directory or the file cannot be used.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        own: tuple[Path, int, sqlite3.Connection] | None = None
        orphans: list[tuple[Path, int]] = []
        for db, fd in list(lock_orphans(directory)):
            if own is not None:
                orphans.append((db, fd))
                continue
            try:
                own = (db, fd, connect(db))
            except (sqlite3.Error, SpoolUnavailable) as exc:
                set_aside(db, fd, exc)
        if own is None:
            new = directory / f"ingest-{uuid.uuid4().hex}{SUFFIX}"
            new_fd = try_lock(lock_path(new))
            if new_fd is None:  # pragma: no cover - a fresh random name cannot be locked already
                raise SpoolUnavailable(f"cannot lock new spool file {new}")
            try:
                own = (new, new_fd, connect(new))
            except BaseException:
                os.close(new_fd)
                raise
        fsync_dir(directory)
    except (OSError, sqlite3.Error) as exc:
        raise SpoolUnavailable(f"spool directory {directory} is not usable: {exc}") from exc
    return (*own, orphans)


def set_aside(db: Path, fd: int, error: Exception) -> None:
    """Rename an unreadable spool file out of the way (kept for an operator) and release its lock."""
    broken = db.with_name(f"{db.name}.broken-{int(time.time())}")
    log.error("spool file %s cannot be read (%s): kept as %s for an operator", db, error, broken)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            db.with_name(db.name + suffix).rename(broken.with_name(broken.name + suffix))
    with contextlib.suppress(OSError):
        lock_path(db).unlink()
    os.close(fd)


def _count(directory: Path, table: str) -> int:
    total = 0
    for db in directory.glob("*" + SUFFIX):
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            total += int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        finally:
            conn.close()
    return total


def spooled_rows(directory: Path) -> int:
    """Rows waiting in every spool file of ``directory``, read-only (for operators and tests)."""
    return _count(directory, "spool")


def parked_rows(directory: Path) -> int:
    """Rows parked (refused for good) in every spool file of ``directory``, read-only."""
    return _count(directory, "parked")
