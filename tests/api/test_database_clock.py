"""Replicas follow the database's clock, so hosts whose clocks differ judge deadlines alike."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import httpx

from gateway.app import create_app
from gateway.config import Settings
from gateway.store import SQLiteStore
from gateway.store.postgres import PostgresStore
from tests.conftest import ADMIN_TOKEN, BASE_URL

AHEAD_S = 3600.0


class StoreAheadByAnHour(SQLiteStore):
    """A real SQLite store that reports its database's clock an hour ahead of the host's."""

    async def clock_offset(self) -> float:
        return AHEAD_S


async def test_the_app_stamps_and_judges_time_by_the_database_clock(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN_TOKEN, secret_key="k" * 32)
    app = create_app(settings, store=StoreAheadByAnHour(tmp_path / "gateway.db"))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url=BASE_URL,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as http,
    ):
        job = (await http.post("/api/v1/jobs", json={"name": "deploy"})).json()
    created = datetime.fromisoformat(job["created_at"].replace("Z", "+00:00")).timestamp()
    assert abs(created - (time.time() + AHEAD_S)) < 60


async def test_postgres_reports_its_clock_against_the_hosts(settings: Settings) -> None:
    """Same host here, so the offset is about zero (measured across one round trip)."""
    if settings.postgres_dsn is None:
        assert await SQLiteStore(settings.data_dir / "x.db").clock_offset() == 0.0
        return
    store = PostgresStore(settings.postgres_dsn)
    await store.open()
    try:
        assert abs(await store.clock_offset()) < 0.5
    finally:
        await store.close()
