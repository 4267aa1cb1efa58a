"""Persistence: one contract (`base.Store`), one implementation per database."""

from __future__ import annotations

from gateway.config import Settings
from gateway.store.base import Store
from gateway.store.sqlite import SQLiteStore


def open_store(settings: Settings) -> Store:
    """The store `settings.db` names (embedded SQLite by default); not yet opened."""
    return SQLiteStore(settings.sqlite_path)


__all__ = ["SQLiteStore", "Store", "open_store"]
