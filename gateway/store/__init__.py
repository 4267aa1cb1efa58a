"""Persistence: one contract (`base.Store`), one implementation per database."""

from __future__ import annotations

from gateway.artifacts import ArtifactLinks
from gateway.config import Settings
from gateway.store.base import Policy, Store
from gateway.store.sqlite import SQLiteStore


def open_store(settings: Settings, links: ArtifactLinks | None = None) -> Store:
    """The store `settings.db` names (embedded SQLite by default, PostgreSQL for a
    `postgresql://` URL); not yet opened. `links` sign the artifact URLs frozen into terminal
    events."""
    policy = Policy(
        confirm_timeout_s=settings.confirm_timeout_s,
        runner_timeout_s=settings.runner_heartbeat_timeout_s,
        inline_bytes=settings.webhook_inline_bytes,
    )
    if settings.postgres_dsn is not None:
        # Imported here: asyncpg costs a few MB of memory a SQLite gateway does not need.
        from gateway.store.postgres import PostgresStore

        return PostgresStore(settings.postgres_dsn, policy, links, pool_size=settings.db_pool_size)
    return SQLiteStore(settings.sqlite_path, policy, links)


__all__ = ["Policy", "SQLiteStore", "Store", "open_store"]
