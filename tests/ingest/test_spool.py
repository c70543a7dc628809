"""The spool on its own (no Kafka): order, limit, reopening, exclusive ownership, orphan adoption."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ingest.record import RawRecord
from ingest.spool import Spool
from ingest.spool_files import SUFFIX, SpoolUnavailable, parked_rows, spooled_rows

RAW = "t.sentry.webhooks.raw"


def msg(n: int, key: str = "org/1", size: int = 10) -> RawRecord:
    value = f"{n:06d}".encode().ljust(size, b".")
    headers = (("delivery_id", f"d{n}".encode()), ("odd", bytes(range(256))))
    return RawRecord(key=key.encode(), value=value, headers=headers, received_at=1000.0 + n)


def numbers(rows: list[RawRecord]) -> list[int]:
    return [int(m.value[:6]) for m in rows]


def peek_all(spool: Spool) -> list[RawRecord]:
    return [r.record for r in spool.peek(10_000, 1 << 40)]


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*" + SUFFIX))


def test_append_peek_delete_keep_order(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, RAW, 1 << 20)
    try:
        assert spool.append([msg(1), msg(2, key="org/2"), msg(3)]) == [True, True, True]
        assert spool.append([msg(4)]) == [True]
        assert numbers(peek_all(spool)) == [1, 2, 3, 4]
        stats = spool.stats()
        assert stats.depth == 4
        assert stats.bytes == sum(msg(n).size for n in (1, 2, 3, 4))
        assert stats.oldest_received_at == 1001.0

        first = spool.peek(2, 1 << 20)
        assert numbers([r.record for r in first]) == [1, 2]
        assert first[0].record == msg(1)  # key, value and arbitrary header bytes survive
        spool.delete(first)
        assert numbers(peek_all(spool)) == [3, 4]
        assert spool.stats().oldest_received_at == 1003.0
        # peek's byte budget: always the first row, then only what fits
        spool.append([msg(5, size=1000), msg(6, size=1000)])
        assert numbers([r.record for r in spool.peek(10, 1)]) == [3]
        assert numbers([r.record for r in spool.peek(10, msg(3).size + msg(4).size)]) == [3, 4]
    finally:
        spool.close()


def test_byte_limit_refuses_what_does_not_fit_and_frees_on_delete(tmp_path: Path) -> None:
    one = msg(1, size=1000).size
    spool = Spool.open(tmp_path, RAW, 3 * one)
    try:
        assert spool.append([msg(1, size=1000), msg(2, size=1000)]) == [True, True]
        assert spool.append([msg(3, size=1000), msg(4, size=1000)]) == [True, False]
        assert spool.append([msg(5, size=1000)]) == [False]
        assert numbers(peek_all(spool)) == [1, 2, 3]
        spool.delete(spool.peek(1, 1 << 20))
        assert spool.append([msg(6, size=1000)]) == [True]
        assert numbers(peek_all(spool)) == [2, 3, 6]
    finally:
        spool.close()


def test_reopen_after_close_keeps_rows_and_order(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, RAW, 1 << 20)
    spool.append([msg(1), msg(2)])
    path = spool.path
    spool.close()
    assert spool_files(tmp_path) == [path]
    assert spooled_rows(tmp_path) == 2

    again = Spool.open(tmp_path, RAW, 1 << 20)
    try:
        assert again.path == path  # the restarted process finds its spool again
        again.append([msg(3)])
        assert numbers(peek_all(again)) == [1, 2, 3]
        again.delete(again.peek(10, 1 << 20))
    finally:
        again.close()
    assert spool_files(tmp_path) == []  # an empty spool leaves nothing behind
    with pytest.raises(SpoolUnavailable):
        again.append([msg(4)])


def test_a_held_spool_is_never_taken_by_another_process(tmp_path: Path) -> None:
    first = Spool.open(tmp_path, RAW, 1 << 20)
    first.append([msg(1)])
    second = Spool.open(tmp_path, RAW, 1 << 20)  # flock is per open file: a second open acts like another process
    try:
        assert second.path != first.path
        assert peek_all(second) == []
        assert second.adopt_orphans() == 0
        assert numbers(peek_all(first)) == [1]
    finally:
        second.close()
        first.close()


def test_orphans_are_taken_over_and_merged_oldest_first(tmp_path: Path) -> None:
    a = Spool.open(tmp_path, RAW, 1 << 20)
    b = Spool.open(tmp_path, RAW, 1 << 20)
    a.append([msg(1), msg(2)])
    b.append([msg(3), msg(4)])
    b.park(b.peek(1, 1 << 20), "too large")  # parked rows move along, never into the queue
    a.close()
    b.close()
    # a's file is older: it is taken over, b is merged after it
    os.utime(a.path, (1, 1))
    c = Spool.open(tmp_path, RAW, 1 << 20)
    try:
        assert c.path == a.path
        assert spool_files(tmp_path) == [a.path]
        assert numbers(peek_all(c)) == [1, 2, 4]
        assert c.stats().depth == 3
        assert parked_rows(tmp_path) == 1

        d = Spool.open(tmp_path, RAW, 1 << 20)
        d.append([msg(5)])
        d.close()  # a worker that died with rows: adopted while running
        assert c.adopt_orphans() == 1
        assert numbers(peek_all(c)) == [1, 2, 4, 5]
        assert spool_files(tmp_path) == [c.path]
    finally:
        c.close()
    assert spool_files(tmp_path) == [a.path]  # rows (and the parked one) remain for the next start


def test_rows_for_another_topic_are_parked_not_queued(tmp_path: Path) -> None:
    other = Spool.open(tmp_path, "old-prefix.sentry.webhooks.raw", 1 << 20)
    mine = Spool.open(tmp_path, RAW, 1 << 20)
    try:
        other.append([msg(1), msg(2)])
        other.close()  # a process with another topic prefix left its rows behind
        mine.append([msg(3)])
        assert mine.adopt_orphans() == 2
        assert numbers(peek_all(mine)) == [3]
        assert mine.stats().depth == 1 and mine.stats().bytes == msg(3).size
        assert parked_rows(tmp_path) == 2  # kept for an operator, never sent to our topic
    finally:
        mine.close()

    taken_over = Spool.open(tmp_path, "yet-another.sentry.webhooks.raw", 1 << 20)
    try:
        assert taken_over.path == mine.path and peek_all(taken_over) == []  # at take-over too
        assert parked_rows(tmp_path) == 3
    finally:
        taken_over.close()


def test_an_unreadable_orphan_is_set_aside_not_fatal(tmp_path: Path) -> None:
    (tmp_path / f"garbage{SUFFIX}").write_bytes(b"this is not a database" * 100)
    spool = Spool.open(tmp_path, RAW, 1 << 20)
    try:
        assert spool.path.name != f"garbage{SUFFIX}"
        assert [p.name for p in tmp_path.glob("garbage*.broken-*")]
        assert spool.append([msg(1)]) == [True]
    finally:
        spool.close()


def test_unusable_directory_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpoolUnavailable):
        Spool.open(blocker / "spool", RAW, 1 << 20)
