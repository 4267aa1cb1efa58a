"""Retention (PRODUCT.md "Ops"): the sweeper prunes terminal jobs older than
GATEWAY_RETENTION_DAYS with everything they own (events, trace, artifacts, webhook messages,
deliveries, attempts, implicit endpoints), whole finished pipelines, in small batches; recent
and unfinished work, and what a kept job still points at, stays."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.clock import ManualClock
from gateway.config import Settings
from gateway.sweeper import Sweeper
from tests.api.test_artifacts import Receiver
from tests.conftest import ADMIN_TOKEN, BASE_URL, continue_path, create_job, read_db

DAY = 86_400
RETENTION_DAYS = 30
PAST_RETENTION = (RETENTION_DAYS + 1) * DAY
# A loopback URL nothing listens on: implicit endpoints are made, never reached.
NOWHERE = "http://127.0.0.1:9/hook"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings,
        retention_days=RETENTION_DAYS,
        webhook_allow_nets="127.0.0.0/8",
        webhook_retry_schedule="0.05",
    )


def count_rows(settings: Settings, sql: str, *params: Any) -> int:
    count: int = read_db(settings, sql, *params)[0][0]
    return count


def owned_rows(settings: Settings, job_id: str) -> dict[str, int]:
    """How many rows of each table belong to the job."""
    by_job = {
        "jobs": "id",
        "job_events": "job_id",
        "job_trace": "job_id",
        "artifacts": "job_id",
        "webhook_messages": "job_id",
        "webhook_deliveries": "job_id",
        "event_log": "job_id",
        "webhook_endpoints": "owner_job_id",
    }
    found = {
        table: count_rows(settings, f"SELECT count(*) FROM {table} WHERE {column} = ?", job_id)
        for table, column in by_job.items()
    }
    found["webhook_attempts"] = count_rows(
        settings,
        "SELECT count(*) FROM webhook_attempts WHERE delivery_id NOT IN"
        " (SELECT id FROM webhook_deliveries)",
    )
    return found


async def finish(anon: httpx.AsyncClient, job: dict[str, Any], status: str = "success") -> None:
    response = await anon.post(continue_path(job), json={"status": status})
    assert response.status_code == 200, response.text


async def prune(app: Starlette) -> tuple[int, int]:
    """Run the sweeper's retention pass now; (jobs, pipelines) deleted."""
    pruned = await app.state.sweeper.prune_once()
    return pruned.jobs, pruned.pipelines


async def status_of(client: httpx.AsyncClient, path: str) -> int:
    return (await client.get(path)).status_code


@pytest.fixture
async def hooked(settings: Settings, clock: ManualClock) -> AsyncIterator[Starlette]:
    """The app with its webhook dispatcher running (sweeper driven by hand)."""
    application = create_app(settings, clock=clock, run_sweeper=False, run_dispatcher=True)
    async with application.router.lifespan_context(application):
        yield application


def clients(app: Starlette) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    return (
        httpx.AsyncClient(transport=transport, base_url=BASE_URL, headers=admin),
        httpx.AsyncClient(transport=transport, base_url=BASE_URL),
    )


async def settled_deliveries(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    """The job's deliveries once none is pending (polling with a deadline)."""
    deadline = time.monotonic() + 10
    while True:
        items: list[dict[str, Any]] = (
            await client.get(f"/api/v1/jobs/{job_id}/deliveries")
        ).json()["items"]
        if items and all(d["state"] != "pending" for d in items):
            return items
        assert time.monotonic() < deadline, items
        await asyncio.sleep(0.01)  # polling with a deadline, not synchronisation by sleep


async def test_an_old_terminal_job_goes_with_everything_it_owns(
    hooked: Starlette, clock: ManualClock, settings: Settings
) -> None:
    """Past the retention, a finished job and its events, trace, artifacts, webhook messages,
    deliveries, attempts, event-log entries and implicit endpoint are deleted; an explicit
    subscription that received its events stays."""
    client, anon = clients(hooked)
    async with Receiver() as receiver, client, anon:
        hook = await client.post("/api/v1/webhooks", json={"url": receiver.url})
        assert hook.status_code == 201, hook.text
        job = await create_job(client, state_webhook_url=receiver.url)
        job_id = job["id"]
        assert (await anon.post(f"{continue_path(job)}/log", content=b"working\n")).is_success
        put = await anon.put(f"{continue_path(job)}/artifacts/out.txt", content=b"done")
        assert put.status_code == 201
        await finish(anon, job)
        deliveries = await settled_deliveries(client, job_id)
        assert {d["state"] for d in deliveries} == {"succeeded"}
        assert len(deliveries) == 4  # job.pending and job.success, to both endpoints
        before = owned_rows(settings, job_id)
        assert all(before[t] for t in before if t != "webhook_attempts"), before
        assert count_rows(settings, "SELECT count(*) FROM webhook_attempts") == 4

        clock.advance(PAST_RETENTION)
        assert await prune(hooked) == (1, 0)

        for path in ("", "/events", "/trace", "/deliveries", "/artifacts/out.txt"):
            assert await status_of(client, f"/api/v1/jobs/{job_id}{path}") == 404, path
        assert owned_rows(settings, job_id) == dict.fromkeys(before, 0)
        assert count_rows(settings, "SELECT count(*) FROM webhook_attempts") == 0
        explicit = await client.get(f"/api/v1/webhooks/{hook.json()['id']}")
        assert explicit.status_code == 200
        log = await client.get(f"/api/v1/webhooks/{hook.json()['id']}/deliveries")
        assert log.json()["items"] == []


async def test_recent_and_unfinished_jobs_are_kept(
    app: Starlette, client: httpx.AsyncClient, anon: httpx.AsyncClient, clock: ManualClock
) -> None:
    """Only jobs that finished more than the retention ago go: one finished later, or never,
    stays, however old it is."""
    old = await create_job(client, name="old")
    finished_late = await create_job(client, name="finished-late")
    unfinished = await create_job(client, name="unfinished", callback_timeout_s=366 * DAY)
    await finish(anon, old, "failed")
    clock.advance(2 * DAY)
    await finish(anon, finished_late)
    clock.advance(PAST_RETENTION - 2 * DAY)

    assert await prune(app) == (1, 0)
    assert await status_of(client, f"/api/v1/jobs/{old['id']}") == 404
    assert await status_of(client, f"/api/v1/jobs/{finished_late['id']}") == 200
    assert await status_of(client, f"/api/v1/jobs/{unfinished['id']}") == 200

    clock.advance(2 * DAY)
    assert await prune(app) == (1, 0)
    assert await status_of(client, f"/api/v1/jobs/{finished_late['id']}") == 404
    assert await status_of(client, f"/api/v1/jobs/{unfinished['id']}") == 200
    assert await prune(app) == (0, 0)


async def test_a_retried_job_goes_with_its_latest_attempt(
    app: Starlette, client: httpx.AsyncClient, anon: httpx.AsyncClient, clock: ManualClock
) -> None:
    """An old attempt stays while its retry is unfinished or recent; then both go together."""
    first = await create_job(client)
    await finish(anon, first, "failed")
    retry = (await client.post(f"/api/v1/jobs/{first['id']}/retry")).json()
    clock.advance(PAST_RETENTION)
    assert await prune(app) == (0, 0)
    assert await status_of(client, f"/api/v1/jobs/{first['id']}") == 200

    await finish(anon, retry)
    assert await prune(app) == (0, 0)
    clock.advance(PAST_RETENTION)
    assert await prune(app) == (2, 0)
    for job in (first, retry):
        assert await status_of(client, f"/api/v1/jobs/{job['id']}") == 404


async def test_a_pipeline_goes_whole_once_finished_and_old(
    app: Starlette,
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    clock: ManualClock,
    settings: Settings,
) -> None:
    """A pipeline's old finished job stays while the pipeline runs; once the pipeline finished
    more than the retention ago, it goes with all its jobs, events and implicit endpoints."""
    created = await client.post(
        "/api/v1/pipelines",
        json={
            "name": "release",
            "state_webhook_url": NOWHERE,
            "jobs": {
                "build": {"kind": "external", "state_webhook_url": NOWHERE},
                "approve": {"kind": "external", "callback_timeout_s": 366 * DAY},
            },
        },
    )
    assert created.status_code == 201, created.text
    pipeline = created.json()
    jobs = {job["name"]: job for job in pipeline["jobs"]}
    await finish(anon, jobs["build"])
    clock.advance(PAST_RETENTION)
    assert await prune(app) == (0, 0)
    assert await status_of(client, f"/api/v1/jobs/{jobs['build']['id']}") == 200

    await finish(anon, jobs["approve"])
    clock.advance(PAST_RETENTION)
    assert await prune(app) == (2, 1)
    assert await status_of(client, f"/api/v1/pipelines/{pipeline['id']}") == 404
    for job in jobs.values():
        assert await status_of(client, f"/api/v1/jobs/{job['id']}") == 404
    for table in ("pipelines", "pipeline_events", "jobs", "webhook_messages", "event_log"):
        assert count_rows(settings, f"SELECT count(*) FROM {table}") == 0, table
    assert count_rows(settings, "SELECT count(*) FROM webhook_endpoints") == 0


async def test_pruning_goes_in_batches(
    app: Starlette, client: httpx.AsyncClient, anon: httpx.AsyncClient, clock: ManualClock
) -> None:
    """Each batch deletes at most its limit in one transaction and says whether more is left;
    the sweeper's pass runs batches until none is."""
    jobs = [await create_job(client, name=f"job-{i}") for i in range(5)]
    for job in jobs:
        await finish(anon, job)
    clock.advance(PAST_RETENTION)
    store = app.state.ctx.store
    before = clock.now() - RETENTION_DAYS * DAY
    first = await store.prune(before, 2, clock.now())
    assert (first.jobs, first.more) == (2, True)
    statuses = [await status_of(client, f"/api/v1/jobs/{job['id']}") for job in jobs]
    assert sorted(statuses) == [200, 200, 200, 404, 404]
    sweeper = Sweeper(
        store,
        clock,
        app.state.ctx.metrics,
        interval_s=1,
        retention_s=RETENTION_DAYS * DAY,
        prune_batch_size=2,
    )
    one_batch = await sweeper.prune_once(max_batches=1)
    assert (one_batch.jobs, one_batch.more) == (2, True)
    rest = await sweeper.prune_once()
    assert (rest.jobs, rest.more) == (1, False)
    assert (await client.get("/api/v1/jobs")).json()["items"] == []


async def test_the_running_sweeper_prunes_on_its_own(
    settings: Settings, clock: ManualClock
) -> None:
    """`gateway serve`'s sweeper loop prunes old jobs without being asked (polling with a
    deadline for the result)."""
    fast = dataclasses.replace(settings, sweep_interval_s=0.01)
    application = create_app(fast, clock=clock, run_sweeper=True)
    async with application.router.lifespan_context(application):
        client, anon = clients(application)
        async with client, anon:
            job = await create_job(client)
            await finish(anon, job)
            clock.advance(PAST_RETENTION)
            deadline = time.monotonic() + 10
            while await status_of(client, f"/api/v1/jobs/{job['id']}") != 404:
                assert time.monotonic() < deadline, "the sweeper never pruned the job"
                await asyncio.sleep(0.01)  # polling with a deadline


async def test_a_job_with_a_delivery_in_flight_waits_for_it(
    settings: Settings, clock: ManualClock
) -> None:
    """A job whose webhook attempt is in flight (its lease live) is not pruned under it; once
    the attempt is recorded, the job goes."""
    slow = dataclasses.replace(settings, retention_days=1, webhook_timeout_s=3 * DAY)
    application = create_app(slow, clock=clock, run_sweeper=False, run_dispatcher=True)
    hold = asyncio.Event()
    async with application.router.lifespan_context(application), Receiver(hold) as receiver:
        client, anon = clients(application)
        async with client, anon:
            job = await create_job(client, state_webhook_url=receiver.url)
            await finish(anon, job)
            await receiver.wait_for("job.success")
            clock.advance(DAY + 1)
            assert await prune(application) == (0, 0)
            hold.set()
            await settled_deliveries(client, job["id"])
            assert await prune(application) == (1, 0)
            assert await status_of(client, f"/api/v1/jobs/{job['id']}") == 404
