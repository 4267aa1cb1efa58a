"""The PostgreSQL store (see `store.py`), its schema and the bridge the shared verbs run on."""

from __future__ import annotations

from gateway.store.postgres.schema import migrate
from gateway.store.postgres.store import PostgresStore, is_postgres_url

__all__ = ["PostgresStore", "is_postgres_url", "migrate"]
