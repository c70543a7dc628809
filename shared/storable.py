"""Text PostgreSQL can store: without NUL or lone surrogates, within its column's length."""

from __future__ import annotations

import re

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(value: str) -> bool:
    return _UNSTORABLE.search(value) is None


def clean(value: str | None, limit: int | None = None) -> str | None:
    """``value`` without characters PostgreSQL text cannot hold, cut to ``limit``; None if nothing is left."""
    if value is None:
        return None
    cleaned = _UNSTORABLE.sub("", value)[:limit]
    return cleaned or None
