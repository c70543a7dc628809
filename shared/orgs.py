"""Organizations, their Sentry integration secret and API tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import Connection, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.models import ApiToken, Organization, SentryIntegration
from shared.errors import conflict, invalid, not_found
from shared.mappings import check_slug
from shared.secrets import KeyRing, SecretError, encrypt_secret, reencrypt_secret
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
    session.add(SentryIntegration(org_id=org.id, client_secret=encrypt_secret(secret)))
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
    previous secret until the next rotation. Stored encrypted (``shared.secrets``)."""
    if secret is not None and not 16 <= len(secret) <= 200:
        raise invalid("invalid_secret", "a client secret must be 16-200 characters", "client_secret")
    org = await get_org(session, slug)
    integration = await session.get(SentryIntegration, org.id, with_for_update=True)
    if integration is None:
        raise not_found("not_found", f"organization {slug!r} has no Sentry integration")
    secret = secret or new_client_secret()
    integration.previous_client_secret = integration.client_secret
    integration.client_secret = encrypt_secret(secret)
    integration.rotated_at = func.now()
    await session.flush()
    return secret


def convert_stored_secrets(connection: Connection, convert: Callable[[str], str]) -> int:
    """Replace every stored client secret (current and previous) by ``convert(value)``, rows locked;
    returns how many rows changed. A ``SecretError`` names the org whose value failed.

    Core statements on the table as migration 0006 left it: that migration runs this too."""
    integrations = sa.table(
        "sentry_integrations", sa.column("org_id"), sa.column("client_secret"), sa.column("previous_client_secret")
    )
    orgs = sa.table("organizations", sa.column("id"), sa.column("slug"))
    rows = connection.execute(
        select(orgs.c.slug, integrations.c.org_id, integrations.c.client_secret, integrations.c.previous_client_secret)
        .join(orgs, orgs.c.id == integrations.c.org_id)
        .order_by(integrations.c.org_id)
        .with_for_update(of=integrations)
    ).all()
    changed = 0
    for slug, org_id, current, previous in rows:
        try:
            new = (convert(current), previous and convert(previous))
        except SecretError as exc:
            raise SecretError(f"organization {slug!r}: {exc}") from exc
        if new != (current, previous):
            connection.execute(
                sa.update(integrations)
                .where(integrations.c.org_id == org_id)
                .values(client_secret=new[0], previous_client_secret=new[1])
            )
            changed += 1
    return changed


async def reencrypt_secrets(session: AsyncSession, keys: KeyRing | None = None) -> int:
    """Every stored client secret under the newest key (plain ones encrypted); returns the rows changed."""
    return await session.run_sync(
        lambda sync: convert_stored_secrets(sync.connection(), lambda value: reencrypt_secret(value, keys))
    )


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
