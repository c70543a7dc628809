"""The spool on its own (no Kafka): order, limit, reopening, exclusive ownership, orphan adoption."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ingest.spool import (
    SUFFIX,
    AsyncSpool,
    Spool,
    SpooledMessage,
    SpoolFull,
    SpoolUnavailable,
    spooled_rows,
)

RAW = "t.sentry.webhooks.raw"


def msg(n: int, topic: str = RAW, key: str = "org/1", size: int = 10) -> SpooledMessage:
    value = f"{n:06d}".encode().ljust(size, b".")
    headers = (("delivery_id", f"d{n}".encode()), ("odd", bytes(range(256))))
    return SpooledMessage(topic=topic, key=key.encode(), value=value, headers=headers, received_at=1000.0 + n)


def numbers(rows: list[SpooledMessage]) -> list[int]:
    return [int(m.value[:6]) for m in rows]


def peek_all(spool: Spool, topic: str = RAW) -> list[SpooledMessage]:
    return [r.message for r in spool.peek(topic, 10_000, 1 << 40)]


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*" + SUFFIX))


def test_append_peek_delete_keep_order_per_topic(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, 1 << 20)
    try:
        assert spool.append([msg(1), msg(2, topic="other"), msg(3)]) == [True, True, True]
        assert spool.append([msg(4)]) == [True]
        assert numbers(peek_all(spool)) == [1, 3, 4]
        assert numbers(peek_all(spool, "other")) == [2]
        stats = spool.stats()
        assert dict(stats.depth) == {RAW: 3, "other": 1}
        assert stats.bytes == sum(msg(n).size for n in (1, 2, 3, 4))
        assert stats.oldest_received_at == 1001.0

        first = spool.peek(RAW, 2, 1 << 20)
        assert numbers([r.message for r in first]) == [1, 3]
        assert first[0].message == msg(1)  # key, value and arbitrary header bytes survive
        spool.delete(first)
        assert numbers(peek_all(spool)) == [4]
        assert spool.stats().oldest_received_at == 1002.0  # "other" row 2 is now the oldest
        # peek's byte budget: always the first row, then only what fits
        spool.append([msg(5, size=1000), msg(6, size=1000)])
        assert numbers([r.message for r in spool.peek(RAW, 10, 1)]) == [4]
        assert numbers([r.message for r in spool.peek(RAW, 10, msg(4).size + msg(5, size=1000).size)]) == [4, 5]
    finally:
        spool.close()


def test_byte_limit_refuses_what_does_not_fit_and_frees_on_delete(tmp_path: Path) -> None:
    one = msg(1, size=1000).size
    spool = Spool.open(tmp_path, 3 * one)
    try:
        assert spool.append([msg(1, size=1000), msg(2, size=1000)]) == [True, True]
        assert spool.append([msg(3, size=1000), msg(4, size=1000)]) == [True, False]
        assert spool.append([msg(5, size=1000)]) == [False]
        assert numbers(peek_all(spool)) == [1, 2, 3]
        spool.delete(spool.peek(RAW, 1, 1 << 20))
        assert spool.append([msg(6, size=1000)]) == [True]
        assert numbers(peek_all(spool)) == [2, 3, 6]
    finally:
        spool.close()


def test_reopen_after_close_keeps_rows_and_order(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, 1 << 20)
    spool.append([msg(1), msg(2)])
    path = spool.path
    spool.close()
    assert spool_files(tmp_path) == [path]
    assert spooled_rows(tmp_path) == 2

    again = Spool.open(tmp_path, 1 << 20)
    try:
        assert again.path == path  # the restarted process finds its spool again
        again.append([msg(3)])
        assert numbers(peek_all(again)) == [1, 2, 3]
        again.delete(again.peek(RAW, 10, 1 << 20))
    finally:
        again.close()
    assert spool_files(tmp_path) == []  # an empty spool leaves nothing behind
    with pytest.raises(SpoolUnavailable):
        again.append([msg(4)])


def test_a_held_spool_is_never_taken_by_another_process(tmp_path: Path) -> None:
    first = Spool.open(tmp_path, 1 << 20)
    first.append([msg(1)])
    second = Spool.open(tmp_path, 1 << 20)  # flock is per open file: a second open acts like another process
    try:
        assert second.path != first.path
        assert peek_all(second) == []
        assert second.adopt_orphans() == 0
        assert numbers(peek_all(first)) == [1]
    finally:
        second.close()
        first.close()


def test_orphans_are_taken_over_and_merged_oldest_first(tmp_path: Path) -> None:
    a = Spool.open(tmp_path, 1 << 20)
    b = Spool.open(tmp_path, 1 << 20)
    a.append([msg(1), msg(2)])
    b.append([msg(3), msg(4, topic="other")])
    b.park(b.peek(RAW, 1, 1 << 20), "too large")  # parked rows move along, never into the queue
    a.close()
    b.close()
    # a's file is older: it is taken over, b is merged after it
    import os

    os.utime(a.path, (1, 1))
    c = Spool.open(tmp_path, 1 << 20)
    try:
        assert c.path == a.path
        assert spool_files(tmp_path) == [a.path]
        assert numbers(peek_all(c)) == [1, 2]
        assert numbers(peek_all(c, "other")) == [4]
        assert dict(c.stats().depth) == {RAW: 2, "other": 1}

        d = Spool.open(tmp_path, 1 << 20)
        d.append([msg(5)])
        d.close()  # a worker that died with rows: adopted while running
        assert c.adopt_orphans() == 1
        assert numbers(peek_all(c)) == [1, 2, 5]
        assert spool_files(tmp_path) == [c.path]
    finally:
        c.close()
    assert spool_files(tmp_path) == [a.path]  # rows (and the parked one) remain for the next start


def test_an_unreadable_orphan_is_set_aside_not_fatal(tmp_path: Path) -> None:
    (tmp_path / f"garbage{SUFFIX}").write_bytes(b"this is not a database" * 100)
    spool = Spool.open(tmp_path, 1 << 20)
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
        Spool.open(blocker / "spool", 1 << 20)


async def test_async_spool_group_commits_in_call_order_and_reports_full(tmp_path: Path) -> None:
    spool = await AsyncSpool.open(tmp_path, 40 * msg(99, size=1000).size, headroom=msg(99, size=1000).size)
    try:
        await asyncio.gather(*(spool.append(msg(n, size=1000)) for n in range(30)))
        assert spool.depth(RAW) == 30 and spool.writable
        assert numbers([r.message for r in await spool.peek(RAW, 100, 1 << 30)]) == list(range(30))

        results = await asyncio.gather(
            *(spool.append(msg(n, size=1000)) for n in range(30, 45)), return_exceptions=True
        )
        assert [r is None for r in results] == [True] * 10 + [False] * 5
        assert all(isinstance(r, SpoolFull) for r in results[10:])
        assert not spool.writable

        rows = await spool.peek(RAW, 5, 1 << 30)
        await spool.delete(rows)
        assert spool.depth(RAW) == 35 and spool.writable
        assert spool.stats.oldest_received_at == 1005.0
    finally:
        await spool.close()
    with pytest.raises(SpoolUnavailable):
        await spool.append(msg(99))
    assert spooled_rows(tmp_path) == 35
