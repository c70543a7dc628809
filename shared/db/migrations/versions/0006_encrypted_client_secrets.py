"""client secrets encrypted at rest

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 09:00:00

- ``sentry_integrations.client_secret`` and ``previous_client_secret`` become ``text``: an encrypted
  value (``fernet:`` + a Fernet token, ``shared/secrets.py``) is longer than the 200-character secret.
- Every plain value is encrypted in place with the newest key of ``BLAMETRAIL_SECRET_KEYS`` (read from
  the environment: set it before ``blametrail migrate``). Values already encrypted are left alone, so
  running it again changes nothing.
- Downgrade decrypts them back (every key that encrypted them must be in the setting).

Old ingest processes read an encrypted value as the secret itself and reject every webhook: upgrade
ingest first (the new code reads plain and encrypted values alike), then migrate.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shared.orgs import convert_stored_secrets
from shared.secrets import decrypt_secret, encrypt_if_plain, key_ring

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COLUMNS = ("client_secret", "previous_client_secret")


def upgrade() -> None:
    for column in COLUMNS:
        op.alter_column("sentry_integrations", column, type_=sa.Text(), existing_type=sa.String(length=200))
    keys = key_ring()
    convert_stored_secrets(op.get_bind(), lambda value: encrypt_if_plain(value, keys))


def downgrade() -> None:
    keys = key_ring()
    convert_stored_secrets(op.get_bind(), lambda value: decrypt_secret(value, keys))
    for column in COLUMNS:
        op.alter_column("sentry_integrations", column, type_=sa.String(length=200), existing_type=sa.Text())
