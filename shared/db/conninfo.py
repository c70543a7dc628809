"""How the services reach PostgreSQL, without SQLAlchemy: what ingest (which does not load it) needs
too: the connect timeout, the URL as libpq takes it, the mappings channel."""

from __future__ import annotations

from shared.settings import Settings

# Seconds (libpq's ``connect_timeout``, at least 2) before a connect to a database host that does not
# answer fails: without it the OS gives up after minutes, and a request or a LISTEN waits that long.
DB_CONNECT_TIMEOUT = 5

# The channel the mapping, organization and integration triggers notify (migrations 0002, 0005).
MAPPINGS_CHANNEL = "sentry_project_mappings"


def libpq_url(settings: Settings) -> str:
    """The database URL as psycopg itself takes it (without SQLAlchemy's driver suffix)."""
    return as_libpq(settings.database_url)


def as_libpq(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL (``postgresql+psycopg://…``) as libpq takes it."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql://{rest}" if sep and scheme.startswith("postgresql") else url
