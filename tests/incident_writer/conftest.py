"""Fixtures of the writer tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from shared.settings import Settings
from tests.support.writer import isolated_settings, running_writer


@pytest.fixture(scope="module")
async def stream(migrated: Settings, request: pytest.FixtureRequest) -> AsyncIterator[Settings]:
    """Topics of the test module's own, with one writer running on them for all its tests."""
    settings = await isolated_settings(migrated, request.module.__name__.rsplit(".", 1)[-1])
    async with running_writer(settings):
        yield settings
