"""The embedded SQLite store (see `store.py`), its schema and its verbs."""

from __future__ import annotations

from gateway.store.sqlite.schema import configure, migrate
from gateway.store.sqlite.store import SQLiteStore

__all__ = ["SQLiteStore", "configure", "migrate"]
