"""One pipeline (ingest, router, writer as processes) for every end-to-end test module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from shared.settings import Settings
from tests.support.stack import Stack, running_stack


@pytest.fixture(scope="package")
async def stack(topics: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(topics, tmp_path_factory.mktemp("services")) as stack:
        yield stack
