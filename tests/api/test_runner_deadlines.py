"""Runner-side deadlines (PRODUCT.md "Runner API"), crossed with the manual clock and one sweep:
an unconfirmed hand-out goes back to the queue, a silent running job fails
`runner_system_failure`, `timeout_s` and `queue_timeout_s` are enforced by the server."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.clock import ManualClock
from gateway.config import Settings
from tests.api.test_runner_api import (
    HandOut,
    append,
    assert_error,
    assert_job_status,
    claim,
    claim_and_confirm,
    confirm,
    event_states,
    fetch_job,
    put_state,
    register,
    register_runner,
    request_job,
    script_job,
    wait_until_polled,
)
from tests.conftest import ADMIN_TOKEN, BASE_URL, create_job, sweep

CONFIRM_TIMEOUT_S = 60  # the fixture's settings keep the defaults
RUNNER_TIMEOUT_S = 300


# --- confirmation deadline ---------------------------------------------------------------------


async def test_unconfirmed_hand_out_returns_to_pending_in_its_queue_place(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """Past confirm_timeout_s a hand-out goes back to pending, same id and attempt, ahead of
    younger jobs; the old job token gets 403 and the next hand-out carries a new one."""
    token = await register_runner(client)
    first = await script_job(client, name="first")
    clock.advance(1)
    younger = await script_job(client, name="younger")
    lost = await claim(anon, token)
    assert lost.id == first["id"]
    clock.advance(CONFIRM_TIMEOUT_S - 1)
    await sweep(app)
    assert (await fetch_job(client, first["id"]))["runner_id"] is not None  # not yet
    clock.advance(2)
    await sweep(app)
    stored = await fetch_job(client, first["id"])
    assert (stored["state"], stored["attempt"], stored["runner_id"]) == ("pending", 1, None)
    assert stored["started_at"] is None
    assert await event_states(client, first["id"]) == ["pending"]
    assert_error(await put_state(anon, lost, {"state": "running"}), 403)
    again = await claim(anon, token)
    assert (again.id, again.body["attempt"]) == (first["id"], 1)
    assert again.token != lost.token
    assert_error(await put_state(anon, lost, {"state": "running"}), 403)
    await confirm(anon, again)
    assert (await claim(anon, token)).id == younger["id"]


async def test_one_sweep_requeues_a_hand_out_and_fails_the_jobs_due_beside_it(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """In one sweep batch an unconfirmed hand-out goes back to pending while external jobs due
    at the same time fail, each with the reason of its earliest clock, each with one event."""
    token = await register_runner(client)
    handed = await script_job(client, name="handed")
    await claim(anon, token)
    late = await create_job(client, callback_timeout_s=CONFIRM_TIMEOUT_S - 10)
    silent = await create_job(
        client, heartbeat_timeout_s=CONFIRM_TIMEOUT_S - 20, callback_timeout_s=3600
    )
    clock.advance(CONFIRM_TIMEOUT_S + 1)
    assert await sweep(app) == 3
    stored = await fetch_job(client, handed["id"])
    assert (stored["state"], stored["runner_id"]) == ("pending", None)
    for job, reason in ((late, "callback_timeout"), (silent, "heartbeat_timeout")):
        stored = await fetch_job(client, job["id"])
        assert (stored["state"], stored["failure_reason"]) == ("failed", reason)
        assert await event_states(client, job["id"]) == ["pending", "failed"]
    assert await sweep(app) == 0


async def test_a_confirmed_hand_out_is_not_requeued(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """A confirmation in time stops the confirmation clock: the job stays running past it."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim(anon, token)
    clock.advance(CONFIRM_TIMEOUT_S - 1)
    await confirm(anon, handout)
    clock.advance(CONFIRM_TIMEOUT_S)
    assert await sweep(app) == 0
    assert (await fetch_job(client, job["id"]))["state"] == "running"


async def test_requeued_async_job_gets_a_new_continue_url(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """A requeued async job's old continue URL is revoked (404); the next hand-out carries a new
    one, which works."""
    token = await register_runner(client)
    job = await script_job(client, **{"async": True})
    lost = await claim(anon, token)
    assert (await anon.get(lost.continue_path)).status_code == 200
    clock.advance(CONFIRM_TIMEOUT_S + 1)
    await sweep(app)
    assert_error(await anon.get(lost.continue_path), 404)
    assert_error(await anon.post(lost.continue_path, json={}), 404)
    again = await claim(anon, token)
    assert again.continue_path != lost.continue_path
    await confirm(anon, again)
    exited = await put_state(anon, again, {"state": "success"})
    assert exited.json() == {"state": "waiting"}
    assert_error(await anon.post(lost.continue_path, json={}), 404)
    done = await anon.post(again.continue_path, json={})
    assert done.status_code == 200, done.text
    assert (await fetch_job(client, job["id"]))["state"] == "success"


async def test_a_requeue_wakes_a_waiting_long_poll(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """A job put back in the queue by the sweeper wakes a request that is waiting for work."""
    token = await register_runner(client)
    await script_job(client)
    lost = await claim(anon, token)
    other = await register(client)
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(request_job(anon, other["token"], wait_s=10))
    await wait_until_polled(client, other["id"])
    assert not waiting.done()
    clock.advance(CONFIRM_TIMEOUT_S + 1)
    started = loop.time()
    await sweep(app)
    response = await waiting
    assert response.status_code == 201, response.text
    assert response.json()["id"] == lost.id
    assert loop.time() - started < 1.0


# --- the runner's heartbeat --------------------------------------------------------------------


async def test_a_silent_running_job_fails_with_runner_system_failure(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """A running job not heard from for runner_heartbeat_timeout_s fails runner_system_failure;
    the runner's late calls then get 409 with Job-Status: failed."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim_and_confirm(anon, token)
    clock.advance(RUNNER_TIMEOUT_S - 1)
    assert await sweep(app) == 0
    clock.advance(2)
    assert await sweep(app) == 1
    stored = await fetch_job(client, job["id"])
    assert (stored["state"], stored["failure_reason"]) == ("failed", "runner_system_failure")
    late = await put_state(anon, handout, {"state": "success"})
    assert_error(late, 409)
    assert_job_status(late, "failed")


@pytest.mark.parametrize("ping", ["keepalive", "trace"])
async def test_keepalives_and_trace_appends_keep_a_running_job_alive(
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    app: Starlette,
    clock: ManualClock,
    ping: str,
) -> None:
    """Each PUT {"state": "running"} or trace append pushes the runner deadline to
    runner_heartbeat_timeout_s from then: the job outlives several timeouts, then fails once
    the pings stop."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim_and_confirm(anon, token)
    offset = 0
    for _ in range(4):
        clock.advance(RUNNER_TIMEOUT_S - 10)
        if ping == "keepalive":
            response = await put_state(anon, handout, {"state": "running"})
            assert response.status_code == 200
        else:
            await append(anon, handout, b"tick\n", offset)
            offset += 5
        assert await sweep(app) == 0
    assert (await fetch_job(client, job["id"]))["state"] == "running"
    clock.advance(RUNNER_TIMEOUT_S + 1)
    await sweep(app)
    stored = await fetch_job(client, job["id"])
    assert (stored["state"], stored["failure_reason"]) == ("failed", "runner_system_failure")


async def test_a_parked_job_no_longer_needs_its_runner(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """Once an async job exited 0 and waits, runner silence does not fail it: the runner is
    released; only the callback deadline counts."""
    token = await register_runner(client)
    job = await script_job(client, callback_timeout_s=3 * RUNNER_TIMEOUT_S, **{"async": True})
    handout = await claim_and_confirm(anon, token)
    assert (await put_state(anon, handout, {"state": "success"})).json() == {"state": "waiting"}
    clock.advance(2 * RUNNER_TIMEOUT_S)
    assert await sweep(app) == 0
    assert (await fetch_job(client, job["id"]))["state"] == "waiting"
    clock.advance(RUNNER_TIMEOUT_S + 1)
    await sweep(app)
    stored = await fetch_job(client, job["id"])
    assert (stored["state"], stored["failure_reason"]) == ("failed", "callback_timeout")


async def test_early_callback_overridden_by_a_lost_runner_is_not_replayed(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """An early call kept while the runner is lost: the job fails runner_system_failure and the
    early caller's repeat gets 409 already_final saying so."""
    token = await register_runner(client)
    await script_job(client, **{"async": True})
    handout = await claim_and_confirm(anon, token)
    assert (await anon.post(handout.continue_path, json={"outputs": {"A": "1"}})).status_code == 202
    clock.advance(RUNNER_TIMEOUT_S + 1)
    await sweep(app)
    repeat = await anon.post(handout.continue_path, json={"outputs": {"A": "1"}})
    refused = assert_error(repeat, 409, "already_final")
    assert (refused["state"], refused["failure_reason"]) == ("failed", "runner_system_failure")
    assert (await fetch_job(client, handout.id))["outputs"] == {}


@pytest.fixture
async def tuned_client(
    settings: Settings, clock: ManualClock
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """An app whose confirmation and runner deadlines are short (10 s and 50 s)."""
    tuned = dataclasses.replace(settings, confirm_timeout_s=10, runner_heartbeat_timeout_s=50)
    application = create_app(tuned, clock=clock, run_sweeper=False)
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application), base_url=BASE_URL
        ) as http,
    ):
        yield application, http


async def test_settings_decide_the_confirm_and_runner_deadlines(
    tuned_client: tuple[Starlette, httpx.AsyncClient], clock: ManualClock
) -> None:
    """GATEWAY_CONFIRM_TIMEOUT_S and GATEWAY_RUNNER_HEARTBEAT_TIMEOUT_S are what the server
    enforces, and the hand-out's heartbeat_interval_s is well within the latter."""
    app, http = tuned_client
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    runner = (await http.post("/api/v1/runners", json={}, headers=admin)).json()
    job = (
        await http.post(
            "/api/v1/jobs", json={"name": "j", "kind": "script", "script": ["true"]}, headers=admin
        )
    ).json()
    lost = await claim(http, runner["token"])
    assert 0 < lost.body["heartbeat_interval_s"] < 50
    clock.advance(11)
    await sweep(app)
    assert_error(await put_state(http, lost, {"state": "running"}), 403)
    handout: HandOut = await claim_and_confirm(http, runner["token"])
    clock.advance(51)
    await sweep(app)
    stored = (await http.get(f"/api/v1/jobs/{job['id']}", headers=admin)).json()
    assert (stored["state"], stored["failure_reason"]) == ("failed", "runner_system_failure")
    assert handout.id == job["id"]


# --- timeout_s and queue_timeout_s -------------------------------------------------------------


async def test_timeout_s_is_enforced_by_the_server(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """A job past its timeout_s fails job_execution_timeout even though its runner keeps it
    alive and never reports; the runner's next call gets 409 Job-Status: failed."""
    token = await register_runner(client)
    job = await script_job(client, timeout_s=100)
    handout = await claim_and_confirm(anon, token)
    for _ in range(3):
        clock.advance(30)
        assert (await put_state(anon, handout, {"state": "running"})).status_code == 200
        assert await sweep(app) == 0
    clock.advance(11)
    assert await sweep(app) == 1
    stored = await fetch_job(client, job["id"])
    assert (stored["state"], stored["failure_reason"]) == ("failed", "job_execution_timeout")
    late = await put_state(anon, handout, {"state": "running"})
    assert_error(late, 409)
    assert_job_status(late, "failed")


async def test_timeout_s_counts_from_confirmation_not_hand_out(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """The execution clock starts when the runner confirms (the script starts then)."""
    token = await register_runner(client)
    job = await script_job(client, timeout_s=100)
    handout = await claim(anon, token)
    clock.advance(50)
    await confirm(anon, handout)
    clock.advance(99)
    assert await sweep(app) == 0
    clock.advance(2)
    assert await sweep(app) == 1
    stored = await fetch_job(client, job["id"])
    assert stored["failure_reason"] == "job_execution_timeout"


async def test_queue_timeout_fails_a_job_nobody_picks(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """A job no runner can take fails queue_timeout after queue_timeout_s, and is then never
    handed out."""
    token = await register_runner(client, tags=["linux"], run_untagged=False)
    job = await script_job(client, queue_timeout_s=120, tags=["windows"])
    clock.advance(119)
    assert await sweep(app) == 0
    assert (await fetch_job(client, job["id"]))["state"] == "pending"
    clock.advance(2)
    assert await sweep(app) == 1
    stored = await fetch_job(client, job["id"])
    assert (stored["state"], stored["failure_reason"]) == ("failed", "queue_timeout")
    assert (await request_job(anon, token)).status_code == 204


async def test_a_job_picked_in_time_has_no_queue_timeout(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """Once confirmed, a job's queue_timeout_s no longer applies."""
    token = await register_runner(client)
    job = await script_job(client, queue_timeout_s=120)
    await claim_and_confirm(anon, token)
    clock.advance(200)
    assert await sweep(app) == 0
    assert (await fetch_job(client, job["id"]))["state"] == "running"


async def test_an_early_call_through_a_revoked_url_is_dropped_with_it(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """A terminal call kept during a hand-out that times out unconfirmed goes with the revoked
    URL: the next attempt's exit 0 parks the job instead of applying it."""
    token = await register_runner(client)
    job = await script_job(client, **{"async": True})
    lost = await claim(anon, token)
    url = next(v["value"] for v in lost.body["variables"] if v["key"] == "CI_JOB_CONTINUE_URL")
    early = await anon.post(url.removeprefix(BASE_URL), json={"outputs": {"IP": "10.0.0.9"}})
    assert early.status_code == 202
    clock.advance(CONFIRM_TIMEOUT_S + 1)
    await sweep(app)
    again = await claim_and_confirm(anon, token)
    assert again.id == job["id"]
    finished = await put_state(anon, again, {"state": "success", "exit_code": 0})
    assert finished.json() == {"state": "waiting"}
    assert (await fetch_job(client, job["id"]))["outputs"] == {}
