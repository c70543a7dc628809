"""The spool driven from asyncio: group commit in call order, full and closed spools."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ingest.async_spool import AsyncSpool
from ingest.spool_files import SpoolFull, SpoolUnavailable, spooled_rows
from tests.ingest.test_spool import RAW, msg, numbers


async def test_async_spool_group_commits_in_call_order_and_reports_full(tmp_path: Path) -> None:
    spool = await AsyncSpool.open(tmp_path, RAW, 40 * msg(99, size=1000).size, headroom=msg(99, size=1000).size)
    try:
        await asyncio.gather(*(spool.append(msg(n, size=1000)) for n in range(30)))
        assert spool.depth == 30 and spool.writable
        assert numbers([r.record for r in await spool.peek(100, 1 << 30)]) == list(range(30))

        results = await asyncio.gather(
            *(spool.append(msg(n, size=1000)) for n in range(30, 45)), return_exceptions=True
        )
        assert [r is None for r in results] == [True] * 10 + [False] * 5
        assert all(isinstance(r, SpoolFull) for r in results[10:])
        assert not spool.writable

        rows = await spool.peek(5, 1 << 30)
        await spool.delete(rows)
        assert spool.depth == 35 and spool.writable
        assert spool.stats.oldest_received_at == 1005.0
    finally:
        await spool.close()
    with pytest.raises(SpoolUnavailable):
        await spool.append(msg(99))
    assert spooled_rows(tmp_path) == 35


async def test_keys_are_held_while_their_rows_are_spooled_and_unknown_rows_hold_every_key(tmp_path: Path) -> None:
    spool = await AsyncSpool.open(tmp_path, RAW, 1 << 20)
    try:
        await spool.append(msg(1))
        key = msg(1).key
        assert spool.may_hold(key) and not spool.may_hold(b"another key")
        await spool.delete(await spool.peek(10, 1 << 30))
        assert not spool.may_hold(key)
        await spool.append(msg(2))  # left for the next start
    finally:
        await spool.close()

    spool = await AsyncSpool.open(tmp_path, RAW, 1 << 20)  # an earlier run's row: its key is unknown here
    try:
        assert spool.may_hold(b"another key")
        await spool.delete(await spool.peek(10, 1 << 30))
        assert not spool.may_hold(b"another key") and not spool.may_hold(msg(2).key)  # empty: known again
    finally:
        await spool.close()
