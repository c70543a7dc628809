"""Fixtures of the ingest tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.ingest.fake_kafka import FakeBroker, Harness, make


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """A publisher on a fresh spool, its producers talking to a fake broker that acknowledges."""
    h = await make(tmp_path, FakeBroker())
    yield h
    await h.publisher.close()
