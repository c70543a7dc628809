"""Sentry client secrets encrypted at rest: the key ring, the stored form, migration 0006 and the CLI."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator

import pytest
from alembic import command
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ingest.secrets import SecretCache
from shared.credentials import Connections, org_secrets
from shared.db.migrate import alembic_config, upgrade
from shared.db.models import Organization, SentryIntegration
from shared.orgs import convert_stored_secrets, get_org
from shared.secrets import (
    DEVELOPMENT_KEY,
    PREFIX,
    KeyRing,
    SecretError,
    _ring,
    decrypt_secret,
    encrypt_if_plain,
    encrypt_secret,
    key_ring,
    reencrypt_secret,
)
from shared.security import sign, signature_matches
from shared.settings import Settings
from tests.cli.test_cli import fails, run

OLD, NEW = Fernet.generate_key().decode(), Fernet.generate_key().decode()
SECRET = "0123456789abcdef" * 4


# --- the key ring and the stored form ------------------------------------------------------------


def test_round_trip() -> None:
    keys = KeyRing([NEW])
    stored = encrypt_secret(SECRET, keys)
    assert stored.startswith(PREFIX) and SECRET not in stored
    assert decrypt_secret(stored, keys) == SECRET
    assert encrypt_secret(SECRET, keys) != stored  # a fresh IV each time


def test_a_plain_value_from_before_encryption_is_read_as_it_is() -> None:
    keys = KeyRing([NEW])
    assert decrypt_secret(SECRET, keys) == SECRET
    encrypted = encrypt_if_plain(SECRET, keys)
    assert decrypt_secret(encrypted, keys) == SECRET
    assert encrypt_if_plain(encrypted, KeyRing([OLD])) == encrypted  # not opened, not touched


def test_rotation_old_key_still_decrypts_and_reencryption_moves_to_the_new_key() -> None:
    stored = encrypt_secret(SECRET, KeyRing([OLD]))
    rotated = KeyRing.parse(f" {NEW} , {OLD} ")
    assert decrypt_secret(stored, rotated) == SECRET
    moved = reencrypt_secret(stored, rotated)
    assert moved != stored and decrypt_secret(moved, KeyRing([NEW])) == SECRET
    assert reencrypt_secret(moved, rotated) == moved  # already under the newest key
    assert decrypt_secret(reencrypt_secret(SECRET, rotated), KeyRing([NEW])) == SECRET  # plain: encrypted
    with pytest.raises(SecretError):
        decrypt_secret(stored, KeyRing([NEW]))  # the old key dropped too early


@pytest.mark.parametrize(
    "tamper",
    [
        lambda v: v[:-5] + ("A" if v[-5] != "A" else "B") + v[-4:],  # a flipped byte: the HMAC fails
        lambda v: v[: len(PREFIX) + 20],  # truncated
        lambda v: PREFIX + "not base64 at all!",
    ],
)
def test_a_tampered_value_fails_with_a_clear_error(tamper: Callable[[str], str]) -> None:
    keys = KeyRing([NEW])
    stored = encrypt_secret(SECRET, keys)
    with pytest.raises(SecretError, match="cannot be decrypted with any key of BLAMETRAIL_SECRET_KEYS"):
        decrypt_secret(tamper(stored), keys)
    with pytest.raises(SecretError):
        reencrypt_secret(tamper(stored), keys)


def test_a_bad_key_is_refused_without_showing_it() -> None:
    with pytest.raises(SecretError, match="key 2 is not a Fernet key") as info:
        KeyRing.parse(f"{NEW},not-a-real-key-value")
    assert "not-a-real-key-value" not in str(info.value)
    with pytest.raises(SecretError, match="holds no key"):
        KeyRing.parse(" , ")


def test_without_keys_the_development_key_is_used_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    _ring.cache_clear()
    with caplog.at_level(logging.WARNING, "blametrail.secrets"):
        keys = key_ring(Settings(secret_keys=""))
        key_ring(Settings(secret_keys=""))
    warnings = [r for r in caplog.records if "BLAMETRAIL_SECRET_KEYS is not set" in r.getMessage()]
    assert len(warnings) == 1 and DEVELOPMENT_KEY in warnings[0].getMessage()  # once per process
    assert decrypt_secret(encrypt_secret(SECRET, keys), KeyRing([DEVELOPMENT_KEY])) == SECRET
    assert key_ring(Settings(secret_keys=f"{NEW},{OLD}")).newest is not keys.newest
    assert "secret_keys" not in repr(Settings(secret_keys=NEW))


# --- against the database -----------------------------------------------------------------------


def blametrail(settings: Settings, *args: str, stdin: str | None = None) -> dict[str, object]:
    """``blametrail ARGS`` with exactly ``settings`` (keys included): its JSON output."""
    done = run(settings, *args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def with_keys(settings: Settings, keys: str) -> Settings:
    return settings.model_copy(update={"secret_keys": keys})


async def stored_secrets(sessions: async_sessionmaker[AsyncSession], slug: str) -> list[str]:
    async with sessions() as session:
        integration = await session.get(SentryIntegration, (await get_org(session, slug)).id)
    assert integration is not None
    return [v for v in (integration.client_secret, integration.previous_client_secret) if v is not None]


@pytest.mark.integration
async def test_the_database_holds_no_plain_secret_and_ingest_still_verifies(
    migrated: Settings, sessions: async_sessionmaker[AsyncSession], credentials: Connections, unique_slug: str
) -> None:
    created = blametrail(migrated, "org", "create", unique_slug)["client_secret"]
    assert isinstance(created, str)
    [stored] = await stored_secrets(sessions, unique_slug)
    assert stored.startswith(PREFIX) and created not in stored

    given = "sentry-given-client-secret-" + uuid.uuid4().hex
    blametrail(migrated, "org", "set-secret", unique_slug, stdin=given + "\n")
    stored_now = await stored_secrets(sessions, unique_slug)
    assert len(stored_now) == 2 and all(v.startswith(PREFIX) for v in stored_now)
    assert not {created, given} & set(stored_now) and not any(created in v or given in v for v in stored_now)

    # Ingest's cache decrypts when it loads; webhooks signed with either secret verify.
    cache = SecretCache(credentials, ttl=60)
    secrets = await cache.get(unique_slug)
    assert secrets == (given, created)
    body = b'{"action": "created"}'
    assert signature_matches(sign(given, body), body, secrets)
    assert signature_matches(sign(created, body), body, secrets)
    assert not signature_matches(sign(stored_now[0], body), body, secrets)


@pytest.mark.integration
async def test_a_plain_row_written_during_a_rolling_deploy_is_still_read(
    sessions: async_sessionmaker[AsyncSession], credentials: Connections, unique_slug: str
) -> None:
    async with sessions() as session, session.begin():
        org = Organization(slug=unique_slug, name=unique_slug)
        session.add(org)
        await session.flush()
        session.add(SentryIntegration(org_id=org.id, client_secret=SECRET))
    assert await org_secrets(credentials, unique_slug) == (SECRET,)


# --- a scratch database: migration 0006 and reencrypt-secrets --------------------------------------


@pytest.fixture
def scratch(settings: Settings) -> Iterator[Settings]:
    """Settings of a new, empty database on the test server (dropped afterwards)."""
    url = make_url(settings.database_url)
    name = f"bt_secrets_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            try:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            except ProgrammingError as exc:
                pytest.skip(f"cannot create a scratch database: {exc}")
        yield settings.model_copy(update={"database_url": url.set(database=name).render_as_string(False)})
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _secrets_in(settings: Settings) -> list[tuple[str, str | None]]:
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT client_secret, previous_client_secret FROM sentry_integrations ORDER BY org_id")
            )
            return [(current, previous) for current, previous in rows]
    finally:
        engine.dispose()


def _with_connection(settings: Settings, work: str, **params: object) -> None:
    engine = create_engine(settings.database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(work), params)
    finally:
        engine.dispose()


@pytest.mark.integration
def test_migration_0006_encrypts_plain_secrets_in_place(scratch: Settings) -> None:
    upgrade(scratch, "0005")
    _with_connection(
        scratch,
        """
        WITH o AS (INSERT INTO organizations (slug, name) VALUES ('legacy', 'legacy'), ('fresh', 'fresh') RETURNING id)
        INSERT INTO sentry_integrations (org_id, client_secret, previous_client_secret)
        SELECT id, :current || id, CASE WHEN id % 2 = 0 THEN :previous END FROM o
        """,
        current=SECRET,
        previous="the-previous-plain-secret",
    )
    plain = _secrets_in(scratch)
    upgrade(scratch)
    encrypted = _secrets_in(scratch)
    keys = key_ring()
    for (current, previous), (new_current, new_previous) in zip(plain, encrypted, strict=True):
        assert new_current.startswith(PREFIX) and decrypt_secret(new_current, keys) == current
        assert (new_previous is None) == (previous is None)
        assert previous is None or (new_previous is not None and decrypt_secret(new_previous, keys) == previous)

    # Again: values already encrypted are recognised and left alone.
    engine = create_engine(scratch.database_url)
    try:
        with engine.begin() as connection:
            assert convert_stored_secrets(connection, lambda v: encrypt_if_plain(v, keys)) == 0
    finally:
        engine.dispose()
    assert _secrets_in(scratch) == encrypted

    # Downgrade decrypts them back into the old columns.
    command.downgrade(alembic_config(scratch), "0005")
    assert _secrets_in(scratch) == plain


@pytest.mark.integration
def test_reencrypt_secrets_moves_every_secret_to_the_newest_key(scratch: Settings) -> None:
    upgrade(scratch)
    slug = "rotating"
    created = blametrail(with_keys(scratch, OLD), "org", "create", slug)["client_secret"]
    blametrail(with_keys(scratch, OLD), "org", "rotate-secret", slug)
    _with_connection(scratch, "UPDATE sentry_integrations SET previous_client_secret = :plain", plain=created)
    before = _secrets_in(scratch)

    rotated = with_keys(scratch, f"{NEW},{OLD}")
    assert blametrail(rotated, "org", "reencrypt-secrets") == {"reencrypted": 1}
    [(current, previous)] = _secrets_in(scratch)
    assert previous is not None and (current, previous) != before[0]
    new_only = KeyRing([NEW])
    assert decrypt_secret(current, new_only) == decrypt_secret(before[0][0], KeyRing([OLD]))
    assert previous.startswith(PREFIX) and decrypt_secret(previous, new_only) == created
    assert blametrail(rotated, "org", "reencrypt-secrets") == {"reencrypted": 0}

    # A ring missing the key: a one-line error naming the org, and nothing changed.
    error = fails(with_keys(scratch, OLD), "org", "reencrypt-secrets")
    assert error.startswith("blametrail: error: organization 'rotating': a stored client secret cannot be")
    assert error.endswith("nothing was changed")
    assert _secrets_in(scratch) == [(current, previous)]
