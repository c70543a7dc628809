"""Organizations and their secrets against the real database."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.credentials import Connections, org_secrets
from shared.db.models import ApiToken
from shared.errors import DomainError
from shared.orgs import create_org, rotate_secret
from shared.security import hash_token

pytestmark = pytest.mark.integration


async def test_create_org_stores_token_hashed_and_secret(
    sessions: async_sessionmaker[AsyncSession], credentials: Connections, unique_slug: str
) -> None:
    async with sessions() as session, session.begin():
        new = await create_org(session, unique_slug)
    async with sessions() as session:
        hashes = list(await session.scalars(select(ApiToken.token_hash).where(ApiToken.org_id == new.org_id)))
        assert hashes == [hash_token(new.api_token)]
        assert await org_secrets(credentials, unique_slug) == (new.client_secret,)
        assert await org_secrets(credentials, unique_slug + "-missing") is None


async def test_rotation_keeps_the_previous_secret_until_the_next_one(
    sessions: async_sessionmaker[AsyncSession], credentials: Connections, unique_slug: str
) -> None:
    async with sessions() as session, session.begin():
        first = (await create_org(session, unique_slug)).client_secret
    async with sessions() as session, session.begin():
        second = await rotate_secret(session, unique_slug)
    async with sessions() as session:
        assert await org_secrets(credentials, unique_slug) == (second, first)
    async with sessions() as session, session.begin():
        third = await rotate_secret(session, unique_slug, "sentry-given-secret-0123456789")
    assert third == "sentry-given-secret-0123456789"
    async with sessions() as session:
        assert await org_secrets(credentials, unique_slug) == (third, second)


@pytest.mark.parametrize("slug", ["UPPER", "123", "", "a" * 101, "has space"])
async def test_invalid_org_slug_is_refused(sessions: async_sessionmaker[AsyncSession], slug: str) -> None:
    async with sessions() as session, session.begin():
        with pytest.raises(DomainError) as info:
            await create_org(session, slug)
    assert info.value.code == "invalid_slug"


async def test_duplicate_org_is_refused(sessions: async_sessionmaker[AsyncSession], unique_slug: str) -> None:
    async with sessions() as session, session.begin():
        await create_org(session, unique_slug)
    async with sessions() as session, session.begin():
        with pytest.raises(DomainError) as info:
            await create_org(session, unique_slug)
    assert info.value.code == "exists"
