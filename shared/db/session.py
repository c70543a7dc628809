"""Engines and sessions: async SQLAlchemy (psycopg 3) for the services, plain psycopg for LISTEN."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from shared.db.conninfo import DB_CONNECT_TIMEOUT
from shared.settings import Settings


def create_engine(
    settings: Settings, *, pool_size: int = 5, connect_timeout: int | None = DB_CONNECT_TIMEOUT
) -> AsyncEngine:
    """The pool pings a connection before lending it, so it reconnects by itself after a database restart.
    ``connect_timeout`` bounds a connect to an unreachable or hanging host (None: no bound)."""
    connect_args = {} if connect_timeout is None else {"connect_timeout": connect_timeout}
    return create_async_engine(
        settings.database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker:  # type: ignore[type-arg]
    return async_sessionmaker(engine, expire_on_commit=False)
