"""Secrets, API tokens and Sentry's webhook signature."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

TOKEN_PREFIX = "btk_"


def new_client_secret() -> str:
    return secrets.token_hex(32)


def new_api_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_legacy_token() -> str:
    """The secret path segment of the legacy WebHooks plugin URL (the plugin cannot sign)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def sign(secret: str, body: bytes) -> str:
    """Sentry-Hook-Signature: lowercase hex HMAC-SHA256 of the exact body, keyed by the client secret."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_matches(signature: str | None, body: bytes, candidates: Iterable[str | None]) -> bool:
    """Constant-time check of ``signature`` against every candidate secret (all are compared)."""
    if not signature:
        return False
    given = signature.strip().lower().encode()
    ok = False
    for secret in candidates:
        if secret:
            ok |= hmac.compare_digest(given, sign(secret, body).encode())
    return ok
