"""On PostgreSQL, transactions that log events commit in the order of their log numbers, so an
event stream reading past a number never misses an event committed later with a smaller one."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette

from gateway.config import Settings
from gateway.store.postgres.store import EVENT_LOG_LOCK

OBSERVE_S = 0.5  # how long a job created meanwhile gets to (wrongly) overtake the open one


async def test_a_logged_event_waits_for_an_earlier_number_still_in_flight(
    app: Starlette, client: httpx.AsyncClient, settings: Settings
) -> None:
    if settings.postgres_dsn is None:
        pytest.skip("one writer at a time on SQLite: numbers are taken in commit order")
    store = app.state.ctx.store
    start = await store.stream_head()
    early = await asyncpg.connect(settings.postgres_dsn)
    try:
        writing = early.transaction()
        await writing.start()
        # a writer that took its number and has not committed yet, as a verb would
        await early.execute("SELECT pg_advisory_xact_lock($1)", EVENT_LOG_LOCK)
        in_flight = await early.fetchval(
            "INSERT INTO event_log (kind, owner_id, sequence, event_type, created_at)"
            " VALUES ('job', 'in-flight', 1, 'job.pending', 0) RETURNING seq"
        )
        creating = asyncio.create_task(client.post("/api/v1/jobs", json={"name": "later"}))
        deadline = time.monotonic() + OBSERVE_S
        while time.monotonic() < deadline:
            seen = await store.read_stream(start, pipeline_id=None, job_id=None, limit=10)
            assert seen == [], "a later event overtook one still in flight"
            await asyncio.sleep(0.05)
        await writing.commit()
    finally:
        await early.close()
    assert (await asyncio.wait_for(creating, 10)).status_code == 201
    rows = await store.read_stream(start, pipeline_id=None, job_id=None, limit=10)
    # the in-flight row renders as nothing (no such job); the created job's event follows it
    assert [event.event_type for event in rows] == ["job.pending"]
    assert rows[0].seq > in_flight
