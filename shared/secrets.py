"""Sentry client secrets encrypted at rest: Fernet tokens under a key ring from ``BLAMETRAIL_SECRET_KEYS``.

A stored secret is ``fernet:`` followed by a Fernet token (AES-128-CBC + HMAC-SHA256) made with the
first key of the ring; any key of the ring decrypts. Rotating the key: put a new key first, keep the
old ones after it, run ``blametrail org reencrypt-secrets`` (every value moves to the new key), then
drop the old keys.

A value without the prefix is a plain secret from before migration 0006 (or written by an older
process during a rolling deploy): it is read as it is, and ``reencrypt-secrets`` encrypts it.

Without ``BLAMETRAIL_SECRET_KEYS`` the development key is used: it is derived from a fixed phrase, so
it is public and protects nothing; a warning says so once per process. Production sets the setting.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Sequence
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from shared.settings import Settings, get_settings

log = logging.getLogger("blametrail.secrets")

PREFIX = "fernet:"
DEVELOPMENT_KEY = base64.urlsafe_b64encode(
    hashlib.sha256(b"BlameTrail development secret key: public, never for production").digest()
).decode()


class SecretError(Exception):
    """A key or a stored secret that cannot be used: a configuration problem, not a request's fault."""


class KeyRing:
    """Fernet keys, newest first: encrypt with the newest, decrypt with any."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise SecretError("BLAMETRAIL_SECRET_KEYS holds no key")
        fernets = []
        for number, key in enumerate(keys, 1):
            try:
                fernets.append(Fernet(key))
            except (ValueError, TypeError) as exc:  # the key itself stays out of the message
                raise SecretError(
                    f"BLAMETRAIL_SECRET_KEYS: key {number} is not a Fernet key (32 url-safe base64-encoded "
                    "bytes; make one with: python -c 'from cryptography.fernet import Fernet; "
                    "print(Fernet.generate_key().decode())')"
                ) from exc
        self.newest = fernets[0]
        self.any = MultiFernet(fernets)

    @classmethod
    def parse(cls, setting: str) -> KeyRing:
        """The ring of a comma-separated ``BLAMETRAIL_SECRET_KEYS`` value (blanks around keys ignored)."""
        return cls([key.strip() for key in setting.split(",") if key.strip()])


@lru_cache(maxsize=8)
def _ring(setting: str) -> KeyRing:
    if setting.strip():
        return KeyRing.parse(setting)
    log.warning(
        "BLAMETRAIL_SECRET_KEYS is not set: client secrets are encrypted with the public development key, "
        "which protects nothing. Set it in production (comma-separated Fernet keys, newest first); to keep "
        "reading the secrets stored so far, list the development key last: %s",
        DEVELOPMENT_KEY,
    )
    return KeyRing([DEVELOPMENT_KEY])


def key_ring(settings: Settings | None = None) -> KeyRing:
    """The process's key ring (from ``settings``, by default the environment's), built once per value."""
    return _ring((settings or get_settings()).secret_keys)


def is_encrypted(stored: str) -> bool:
    return stored.startswith(PREFIX)


def encrypt_secret(plain: str, keys: KeyRing | None = None) -> str:
    """The stored form of ``plain``: ``fernet:`` + a token under the newest key."""
    return PREFIX + (keys or key_ring()).newest.encrypt(plain.encode()).decode()


def decrypt_secret(stored: str, keys: KeyRing | None = None) -> str:
    """The secret of a stored value (a plain value from before encryption is returned as it is).

    Raises ``SecretError`` when no key of the ring opens it: a key missing from the setting, or an
    altered value."""
    if not is_encrypted(stored):
        return stored
    try:
        return (keys or key_ring()).any.decrypt(stored[len(PREFIX) :].encode()).decode()
    except InvalidToken:
        raise SecretError(
            "a stored client secret cannot be decrypted with any key of BLAMETRAIL_SECRET_KEYS "
            "(the key it was encrypted with is not in the setting, or the value was altered)"
        ) from None


def encrypt_if_plain(stored: str, keys: KeyRing | None = None) -> str:
    """``stored`` encrypted when it is a plain value; an encrypted value is left as it is (not opened)."""
    return stored if is_encrypted(stored) else encrypt_secret(stored, keys)


def reencrypt_secret(stored: str, keys: KeyRing | None = None) -> str:
    """``stored`` under the newest key: encrypted when plain, re-encrypted when under an older key,
    unchanged when already under the newest. Raises ``SecretError`` when no key opens it."""
    keys = keys or key_ring()
    if is_encrypted(stored):
        try:
            keys.newest.decrypt(stored[len(PREFIX) :].encode())
            return stored
        except InvalidToken:
            pass
    return encrypt_secret(decrypt_secret(stored, keys), keys)
