"""Deadlines (PRODUCT.md "Deadlines"): stored, fired by the sweeper at the manual clock's time,
each once, the earliest deciding the failure reason."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.clock import ManualClock, rfc3339
from gateway.config import DEFAULT_CALLBACK_TIMEOUT_S, Settings
from gateway.metrics import Metrics
from gateway.sweeper import Sweeper
from tests.conftest import api_client, continue_path, create_job, read_db, sweep


async def fetch_job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


async def fetch_events(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/v1/jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def assert_failed(client: httpx.AsyncClient, job_id: str, reason: str) -> dict[str, Any]:
    job = await fetch_job(client, job_id)
    assert job["state"] == "failed"
    assert job["failure_reason"] == reason
    assert job["deadline_at"] is None
    assert job["finished_at"] is not None
    return job


async def test_callback_timeout_fails_an_external_job(
    client: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """Past callback_timeout_s an external job fails with callback_timeout and no deadline."""
    job = await create_job(client, callback_timeout_s=120)
    created = clock.now()
    assert job["deadline_at"] == rfc3339(created + 120)
    clock.advance(119)
    assert await sweep(app) == 0
    assert (await fetch_job(client, job["id"]))["state"] == "pending"
    clock.advance(2)
    assert await sweep(app) == 1
    stored = await assert_failed(client, job["id"], "callback_timeout")
    assert stored["finished_at"] == rfc3339(created + 121)
    last = (await fetch_events(client, job["id"]))[-1]
    assert (last["previous_state"], last["state"]) == ("pending", "failed")
    assert last["failure_reason"] == "callback_timeout"


async def test_heartbeat_timeout_fails_a_silent_external_job(
    client: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """With heartbeat_timeout_s, silence on the continue URL fails the job (heartbeat_timeout)."""
    job = await create_job(client, heartbeat_timeout_s=30, callback_timeout_s=3600)
    assert job["deadline_at"] == rfc3339(clock.now() + 30)
    clock.advance(31)
    assert await sweep(app) == 1
    await assert_failed(client, job["id"], "heartbeat_timeout")


async def test_execution_timeout_bounds_a_started_external_job(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """timeout_s runs from /start: a started external job fails with job_execution_timeout;
    before /start it does not bind."""
    job = await create_job(client, timeout_s=50, callback_timeout_s=3600)
    clock.advance(60)  # past timeout_s, but the job has not started
    assert await sweep(app) == 0
    started = await anon.post(continue_path(job) + "/start")
    assert started.status_code == 200
    assert started.json()["deadline_at"] == rfc3339(clock.now() + 50)
    clock.advance(49)
    assert await sweep(app) == 0
    assert (await fetch_job(client, job["id"]))["state"] == "running"
    clock.advance(2)
    assert await sweep(app) == 1
    await assert_failed(client, job["id"], "job_execution_timeout")
    last = (await fetch_events(client, job["id"]))[-1]
    assert last["previous_state"] == "running"


@pytest.mark.parametrize(
    ("fields", "start", "reason"),
    [
        ({"callback_timeout_s": 100, "heartbeat_timeout_s": 40}, False, "heartbeat_timeout"),
        ({"callback_timeout_s": 40, "heartbeat_timeout_s": 100}, False, "callback_timeout"),
        (
            {"callback_timeout_s": 90, "heartbeat_timeout_s": 60, "timeout_s": 30},
            True,
            "job_execution_timeout",
        ),
        (
            {"callback_timeout_s": 30, "heartbeat_timeout_s": 60, "timeout_s": 90},
            True,
            "callback_timeout",
        ),
        (
            {"callback_timeout_s": 90, "heartbeat_timeout_s": 30, "timeout_s": 60},
            True,
            "heartbeat_timeout",
        ),
    ],
)
async def test_earliest_passed_deadline_decides_the_failure_reason(
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    app: Starlette,
    clock: ManualClock,
    fields: dict[str, int],
    start: bool,
    reason: str,
) -> None:
    """When several deadlines passed before one sweep, the earliest names the failure reason."""
    job = await create_job(client, **fields)
    if start:
        assert (await anon.post(continue_path(job) + "/start")).status_code == 200
    clock.advance(10_000)  # every deadline has passed
    assert await sweep(app) == 1
    await assert_failed(client, job["id"], reason)


async def test_default_callback_timeout_applies_when_none_is_given(
    client: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """A job that names no callback_timeout_s waits GATEWAY_DEFAULT_CALLBACK_TIMEOUT_S (1 day),
    not forever."""
    job = await create_job(client)
    assert job["deadline_at"] == rfc3339(clock.now() + DEFAULT_CALLBACK_TIMEOUT_S)
    clock.advance(DEFAULT_CALLBACK_TIMEOUT_S - 1)
    assert await sweep(app) == 0
    clock.advance(2)
    assert await sweep(app) == 1
    await assert_failed(client, job["id"], "callback_timeout")


async def test_configured_default_callback_timeout_applies_to_jobs_and_retries(
    settings: Settings, clock: ManualClock
) -> None:
    """A configured default callback timeout binds jobs that name none, and their retries."""
    configured = dataclasses.replace(settings, default_callback_timeout_s=600)
    application = create_app(configured, clock=clock, run_sweeper=False)
    async with application.router.lifespan_context(application), api_client(application) as http:
        job = await create_job(http, heartbeat_timeout_s=3600)
        assert job["deadline_at"] == rfc3339(clock.now() + 600)
        named = await create_job(http, callback_timeout_s=900)
        assert named["deadline_at"] == rfc3339(clock.now() + 900)
        clock.advance(601)
        assert await sweep(application) == 1
        await assert_failed(http, job["id"], "callback_timeout")
        retried = await http.post(f"/api/v1/jobs/{job['id']}/retry")
        assert retried.status_code == 201
        assert retried.json()["deadline_at"] == rfc3339(clock.now() + 600)


async def test_sweeping_twice_fires_nothing_the_second_time(
    client: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """A deadline fires once: a second sweep finds nothing and records no event."""
    jobs = [await create_job(client, callback_timeout_s=10) for _ in range(3)]
    clock.advance(11)
    assert await sweep(app) == 3
    clock.advance(1000)
    assert await sweep(app) == 0
    for job in jobs:
        events = await fetch_events(client, job["id"])
        assert [e["state"] for e in events] == ["pending", "failed"]


async def test_finished_jobs_are_never_swept(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """A job finished by its callback or canceled has no live deadline and is never failed."""
    done = await create_job(client, callback_timeout_s=10, heartbeat_timeout_s=5)
    canceled = await create_job(client, callback_timeout_s=10)
    assert (await anon.post(continue_path(done), json={})).status_code == 200
    assert (await client.post(f"/api/v1/jobs/{canceled['id']}/cancel")).status_code == 200
    clock.advance(100)
    assert await sweep(app) == 0
    assert (await fetch_job(client, done["id"]))["state"] == "success"
    assert (await fetch_job(client, canceled["id"]))["state"] == "canceled"


async def test_sweeper_works_through_more_than_one_batch(
    client: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """With a batch smaller than the number of due jobs, one sweep still fails every due job
    (and only those), earliest deadline first."""
    due = [await create_job(client, callback_timeout_s=10 + i) for i in range(7)]
    later = await create_job(client, callback_timeout_s=3600)
    clock.advance(100)
    sweeper = Sweeper(app.state.ctx.store, clock, Metrics(), interval_s=1, batch_size=3)
    assert await sweeper.sweep_once() == 7
    for job in due:
        await assert_failed(client, job["id"], "callback_timeout")
    assert (await fetch_job(client, later["id"]))["state"] == "pending"
    assert await sweeper.sweep_once() == 0
    event_ids = [(await fetch_events(client, job["id"]))[-1]["id"] for job in due]
    assert event_ids == sorted(event_ids)


async def test_sweeper_batch_equal_to_the_due_count(
    client: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """A batch size that divides the due jobs exactly fires them all, and nothing more."""
    due = [await create_job(client, callback_timeout_s=10) for _ in range(4)]
    clock.advance(11)
    sweeper = Sweeper(app.state.ctx.store, clock, Metrics(), interval_s=1, batch_size=2)
    assert await sweeper.sweep_once() == 4
    for job in due:
        await assert_failed(client, job["id"], "callback_timeout")


def _sample(text: str, name: str, labels: dict[str, str]) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_metrics_count_transitions_and_expired_deadlines(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """/metrics counts the transitions a sweep made and the deadlines it expired, by reason."""
    for _ in range(2):
        await create_job(client, callback_timeout_s=10)
    await create_job(client, heartbeat_timeout_s=5, callback_timeout_s=3600)
    finished = await create_job(client)
    await anon.post(continue_path(finished), json={})
    clock.advance(20)
    assert await sweep(app) == 3
    response = await anon.get("/metrics")
    assert response.status_code == 200
    text = response.text
    transitions = "gateway_job_transitions_total"
    assert _sample(text, transitions, {"state": "pending"}) == 4
    assert _sample(text, transitions, {"state": "failed"}) == 3
    assert _sample(text, transitions, {"state": "success"}) == 1
    expired = "gateway_deadlines_expired_total"
    assert _sample(text, expired, {"reason": "callback_timeout"}) == 2
    assert _sample(text, expired, {"reason": "heartbeat_timeout"}) == 1
    assert await sweep(app) == 0
    again = (await anon.get("/metrics")).text
    assert _sample(again, expired, {"reason": "callback_timeout"}) == 2
    assert _sample(again, transitions, {"state": "failed"}) == 3


async def test_deadline_passed_while_down_fires_in_the_first_sweep_after_start(
    settings: Settings, clock: ManualClock
) -> None:
    """Deadlines are stored: one that passed while the server was stopped fires in the first
    sweep of a new app on the same database."""
    first = create_app(settings, clock=clock, run_sweeper=False)
    async with first.router.lifespan_context(first), api_client(first) as http:
        job = await create_job(http, callback_timeout_s=60)
    clock.advance(3600)
    second = create_app(settings, clock=clock, run_sweeper=False)
    async with second.router.lifespan_context(second):
        assert await sweep(second) == 1
        async with api_client(second) as http:
            await assert_failed(http, job["id"], "callback_timeout")


async def test_swept_jobs_get_the_webhook_messages_of_their_subscribers(
    client: httpx.AsyncClient, app: Starlette, settings: Settings, clock: ManualClock
) -> None:
    """A job failed by the sweep gets one message per subscribed event (its own
    state_webhook_url, an explicit subscription to job.failed): the job as GET shows it with
    its previous state and sequence, one delivery per endpoint; an unsubscribed event is only
    logged. Jobs of one sweep whose earliest clocks differ get their own reasons."""
    hook = await client.post(
        "/api/v1/webhooks", json={"url": "https://hooks.example.com/all", "events": ["job.failed"]}
    )
    assert hook.status_code == 201, hook.text
    own = await create_job(
        client, callback_timeout_s=10, state_webhook_url="https://hooks.example.com/own"
    )
    plain = await create_job(client, heartbeat_timeout_s=5, callback_timeout_s=3600)
    clock.advance(20)
    assert await sweep(app) == 2
    reasons = {own["id"]: "callback_timeout", plain["id"]: "heartbeat_timeout"}
    for job_id, reason in reasons.items():
        stored = await assert_failed(client, job_id, reason)
        [(body,)] = read_db(
            settings,
            "SELECT body FROM webhook_messages WHERE job_id = ? AND event_type = ?",
            job_id,
            "job.failed",
        )
        message = json.loads(bytes(body))
        assert message["type"] == "job.failed"
        assert message["data"] == {**stored, "previous_state": "pending", "sequence": 2}
        [(message_id,)] = read_db(
            settings, "SELECT message_id FROM event_log WHERE job_id = ? AND sequence = 2", job_id
        )
        assert message_id == f"job_{job_id}_2"
    own_deliveries = read_db(
        settings, "SELECT count(*) FROM webhook_deliveries WHERE job_id = ?", own["id"]
    )
    plain_deliveries = read_db(
        settings, "SELECT count(*) FROM webhook_deliveries WHERE job_id = ?", plain["id"]
    )
    # own: job.pending and job.failed to its own URL, job.failed to the subscription
    assert (own_deliveries[0][0], plain_deliveries[0][0]) == (3, 1)
