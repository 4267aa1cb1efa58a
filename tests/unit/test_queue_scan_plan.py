"""The hand-out's queue scan reads the `jobs_queue` partial index on SQLite, whatever else is
pending: 100k parked external jobs (also `pending`) once made every claim scan and sort them all
(20 ms a claim; found by bench/soak.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.store.sqlite.schema import configure, migrate
from gateway.store.verbs.connection import SQLITE
from gateway.store.verbs.runners import queue_scan


def test_the_queue_scan_uses_the_queue_index_without_a_sort(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "gateway.sqlite3", isolation_level=None)
    try:
        configure(conn)
        migrate(conn)
        plan = " | ".join(
            row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {queue_scan(SQLITE)}", (50, 0))
        )
    finally:
        conn.close()
    assert "jobs_queue" in plan
    assert "TEMP B-TREE" not in plan
