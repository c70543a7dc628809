"""Organizations, their Sentry integration secret and API tokens."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.models import ApiToken, Organization, SentryIntegration
from shared.errors import conflict, invalid, not_found
from shared.mappings import check_slug
from shared.security import hash_token, new_api_token, new_client_secret, new_legacy_token


@dataclass(frozen=True)
class NewOrg:
    org: str
    org_id: int
    api_token: str
    client_secret: str


async def create_org(session: AsyncSession, slug: str, name: str | None = None) -> NewOrg:
    check_slug(slug, "slug", what="an organization slug")
    org = Organization(slug=slug, name=name or slug)
    session.add(org)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise conflict("exists", f"organization {slug!r} already exists") from exc
    secret = new_client_secret()
    token = new_api_token()
    session.add(SentryIntegration(org_id=org.id, client_secret=secret))
    session.add(ApiToken(org_id=org.id, token_hash=hash_token(token)))
    await session.flush()
    return NewOrg(org=slug, org_id=org.id, api_token=token, client_secret=secret)


async def get_org(session: AsyncSession, slug: str) -> Organization:
    org = await session.scalar(select(Organization).where(Organization.slug == slug))
    if org is None:
        raise not_found("not_found", f"organization {slug!r} does not exist")
    return org


async def rotate_secret(session: AsyncSession, slug: str, secret: str | None = None) -> str:
    """New client secret (generated, or Sentry's own when given); the current one stays valid as the
    previous secret until the next rotation."""
    if secret is not None and not 16 <= len(secret) <= 200:
        raise invalid("invalid_secret", "a client secret must be 16-200 characters", "client_secret")
    org = await get_org(session, slug)
    integration = await session.get(SentryIntegration, org.id, with_for_update=True)
    if integration is None:
        raise not_found("not_found", f"organization {slug!r} has no Sentry integration")
    secret = secret or new_client_secret()
    integration.previous_client_secret = integration.client_secret
    integration.client_secret = secret
    integration.rotated_at = func.now()
    await session.flush()
    return secret


async def org_secrets(session: AsyncSession, slug: str) -> tuple[str, ...] | None:
    """The secrets a webhook of ``slug`` may be signed with, or None for an unknown org."""
    row = (
        await session.execute(
            select(SentryIntegration.client_secret, SentryIntegration.previous_client_secret)
            .join(Organization, Organization.id == SentryIntegration.org_id)
            .where(Organization.slug == slug)
        )
    ).one_or_none()
    if row is None:
        return None
    return tuple(s for s in row if s)


async def enable_legacy_plugin(session: AsyncSession, slug: str) -> str:
    """Turn on the legacy WebHooks plugin endpoint for an org: returns the URL-path token (shown once)."""
    org = await get_org(session, slug)
    integration = await session.get(SentryIntegration, org.id, with_for_update=True)
    if integration is None:
        raise not_found("not_found", f"organization {slug!r} has no Sentry integration")
    token = new_legacy_token()
    integration.legacy_plugin_token = hash_token(token).hex()
    await session.flush()
    return token


async def disable_legacy_plugin(session: AsyncSession, slug: str) -> None:
    org = await get_org(session, slug)
    integration = await session.get(SentryIntegration, org.id, with_for_update=True)
    if integration is not None:
        integration.legacy_plugin_token = None
        await session.flush()


async def legacy_token_hash(session: AsyncSession, slug: str) -> str | None:
    """Hex SHA-256 of the org's legacy plugin token, or None when the org is unknown or has it off."""
    value: str | None = await session.scalar(
        select(SentryIntegration.legacy_plugin_token)
        .join(Organization, Organization.id == SentryIntegration.org_id)
        .where(Organization.slug == slug)
    )
    return value
