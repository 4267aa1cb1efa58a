"""The runner protocol (PRODUCT.md "Runner API"), status code by status code, on the real app
over ASGI: registration, the long-poll hand-out, variables, two-phase confirmation, the trace,
the exit report, cancel, the early callback, and the reference runner driving it all."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.runner import Runner
from tests.conftest import ADMIN_TOKEN, BASE_URL, create_job

REQUEST = "/api/v1/runner/jobs/request"


# --- helpers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HandOut:
    """A job as a runner got it (201 body)."""

    body: dict[str, Any]

    @property
    def id(self) -> str:
        job_id: str = self.body["id"]
        return job_id

    @property
    def token(self) -> str:
        token: str = self.body["token"]
        return token

    @property
    def path(self) -> str:
        return f"/api/v1/runner/jobs/{self.id}"

    @property
    def variables(self) -> dict[str, dict[str, Any]]:
        return {v["key"]: v for v in self.body["variables"]}

    @property
    def continue_path(self) -> str:
        url: str = self.variables["CI_JOB_CONTINUE_URL"]["value"]
        assert url.startswith(f"{BASE_URL}/continue/")
        return url.removeprefix(BASE_URL)


async def register(
    client: httpx.AsyncClient, *, tags: list[str] | None = None, run_untagged: bool = True
) -> dict[str, Any]:
    """Register a runner through the API; returns {id, token, ...}."""
    response = await client.post(
        "/api/v1/runners",
        json={"description": "test", "tags": tags or [], "run_untagged": run_untagged},
    )
    assert response.status_code == 201, response.text
    runner: dict[str, Any] = response.json()
    return runner


async def register_runner(
    client: httpx.AsyncClient, *, tags: list[str] | None = None, run_untagged: bool = True
) -> str:
    """Register a runner through the API and return its token."""
    token: str = (await register(client, tags=tags, run_untagged=run_untagged))["token"]
    return token


async def request_job(
    anon: httpx.AsyncClient, runner_token: str, wait_s: int = 0, **kwargs: Any
) -> httpx.Response:
    return await anon.post(
        REQUEST,
        json={"wait_s": wait_s},
        headers={"Authorization": f"Bearer {runner_token}"},
        timeout=70,
        **kwargs,
    )


async def claim(anon: httpx.AsyncClient, runner_token: str) -> HandOut:
    """Request a job and assert one is handed out at once."""
    response = await request_job(anon, runner_token)
    assert response.status_code == 201, response.text
    assert response.headers["Job-Status"] == "pending"
    return HandOut(response.json())


async def script_job(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    """Create a script job (non-async unless told)."""
    return await create_job(client, **{"kind": "script", "script": ["echo hi"], **fields})


async def put_state(
    anon: httpx.AsyncClient, handout: HandOut, body: dict[str, Any], token: str | None = None
) -> httpx.Response:
    return await anon.put(handout.path, json=body, headers={"Job-Token": token or handout.token})


async def confirm(anon: httpx.AsyncClient, handout: HandOut) -> httpx.Response:
    response = await put_state(anon, handout, {"state": "running"})
    assert response.status_code == 200, response.text
    assert response.headers["Job-Status"] == "running"
    return response


async def claim_and_confirm(anon: httpx.AsyncClient, runner_token: str) -> HandOut:
    handout = await claim(anon, runner_token)
    await confirm(anon, handout)
    return handout


async def patch_trace(
    anon: httpx.AsyncClient,
    handout: HandOut,
    data: bytes,
    content_range: str | None,
    token: str | None = None,
) -> httpx.Response:
    headers = {"Job-Token": token or handout.token, "Content-Type": "text/plain"}
    if content_range is not None:
        headers["Content-Range"] = content_range
    return await anon.patch(f"{handout.path}/trace", content=data, headers=headers)


async def append(anon: httpx.AsyncClient, handout: HandOut, data: bytes, start: int) -> None:
    """Append `data` at `start` and assert it was taken."""
    response = await patch_trace(anon, handout, data, f"{start}-{start + len(data) - 1}")
    assert response.status_code == 202, response.text
    assert response.headers["Range"] == f"0-{start + len(data)}"


async def fetch_job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


async def fetch_trace(client: httpx.AsyncClient, job_id: str) -> str:
    response = await client.get(f"/api/v1/jobs/{job_id}/trace")
    assert response.status_code == 200, response.text
    return response.text


async def event_states(client: httpx.AsyncClient, job_id: str) -> list[str]:
    response = await client.get(f"/api/v1/jobs/{job_id}/events", params={"limit": 500})
    assert response.status_code == 200, response.text
    return [event["state"] for event in response.json()["items"]]


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert isinstance(body.get("error"), str) and isinstance(body.get("detail"), str)
    if code is not None:
        assert body["error"] == code, body
    return body


def assert_job_status(response: httpx.Response, state: str) -> None:
    assert response.headers.get("Job-Status") == state, (response.status_code, response.headers)


# --- registration and runner auth --------------------------------------------------------------


async def test_register_shows_the_token_once_and_lists_the_runner(
    client: httpx.AsyncClient,
) -> None:
    """POST /api/v1/runners answers 201 {id, token}; the list shows the runner, never a token."""
    response = await client.post(
        "/api/v1/runners", json={"description": "r1", "tags": ["linux"], "run_untagged": False}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"] and body["token"]
    listed = (await client.get("/api/v1/runners")).json()["items"]
    assert [r["id"] for r in listed] == [body["id"]]
    assert listed[0]["tags"] == ["linux"] and listed[0]["run_untagged"] is False
    assert "token" not in listed[0]
    assert body["token"] not in (await client.get("/api/v1/runners")).text


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer gwr_not-a-real-runner-token", f"Bearer {ADMIN_TOKEN}", "Basic abc"],
    ids=["missing", "wrong", "api-token", "not-bearer"],
)
async def test_request_without_a_runner_token_is_401(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, authorization: str | None
) -> None:
    """No token, a wrong one, or an API token (not a runner token) -> 401; nothing handed out."""
    job = await script_job(client)
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await anon.post(REQUEST, json={"wait_s": 0}, headers=headers)
    assert_error(response, 401)
    assert (await fetch_job(client, job["id"]))["state"] == "pending"
    assert (await fetch_job(client, job["id"]))["runner_id"] is None


async def test_runner_token_is_not_an_api_token(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A runner token opens the runner routes only: the jobs API refuses it with 401."""
    token = await register_runner(client)
    response = await anon.get("/api/v1/jobs", headers={"Authorization": f"Bearer {token}"})
    assert_error(response, 401)


async def test_revoked_runner_token_is_401(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """DELETE /api/v1/runners/{id} revokes the token: its next request gets 401."""
    response = await client.post("/api/v1/runners", json={})
    runner = response.json()
    assert (await request_job(anon, runner["token"])).status_code == 204
    assert (await client.delete(f"/api/v1/runners/{runner['id']}")).status_code == 204
    assert_error(await request_job(anon, runner["token"]), 401)
    assert (await client.get("/api/v1/runners")).json()["items"] == []


# --- request: hand-out shape, 204, bad bodies --------------------------------------------------


async def test_hand_out_is_201_with_the_documented_shape(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """201 carries {id, name, pipeline_id, attempt, async, script, timeout_s, token,
    heartbeat_interval_s, variables}; the job stays pending (handed out) until confirmed."""
    token = await register_runner(client)
    job = await script_job(client, name="build", script=["make", "make test"], timeout_s=600)
    response = await request_job(anon, token)
    assert response.status_code == 201, response.text
    assert_job_status(response, "pending")
    body = response.json()
    assert set(body) == {
        "id",
        "name",
        "pipeline_id",
        "attempt",
        "async",
        "script",
        "timeout_s",
        "token",
        "heartbeat_interval_s",
        "variables",
    }
    assert body["id"] == job["id"]
    assert body["name"] == "build"
    assert body["pipeline_id"] is None
    assert body["attempt"] == 1
    assert body["async"] is False
    assert body["script"] == ["make", "make test"]
    assert body["timeout_s"] == 600
    assert isinstance(body["token"], str) and len(body["token"]) >= 22
    assert isinstance(body["heartbeat_interval_s"], int) and body["heartbeat_interval_s"] > 0
    for variable in body["variables"]:
        assert set(variable) == {"key", "value", "masked"}
        assert isinstance(variable["value"], str) and isinstance(variable["masked"], bool)
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "pending"
    assert body["token"] not in str(stored)


@pytest.mark.parametrize("wait_s", [0, 1])
async def test_request_with_nothing_to_do_is_204_after_wait_s(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, wait_s: int
) -> None:
    """With no pending job the request answers 204 (empty) once wait_s has passed, not before."""
    token = await register_runner(client)
    await create_job(client)  # external jobs are never handed to runners
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await request_job(anon, token, wait_s=wait_s)
    elapsed = loop.time() - started
    assert response.status_code == 204
    assert response.content == b""
    assert wait_s <= elapsed < wait_s + 1.0


async def test_request_without_a_body_defaults_and_answers(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """An empty body is `{}` (default wait_s): with a job pending the answer is 201 at once."""
    token = await register_runner(client)
    job = await script_job(client)
    response = await anon.post(REQUEST, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 201, response.text
    assert response.json()["id"] == job["id"]


@pytest.mark.parametrize(
    "body",
    [{"wait_s": 61}, {"wait_s": -1}, {"wait_s": "5"}, {"wait_s": 1.5}, {"wait": 1}],
    ids=["over-60", "negative", "string", "float", "unknown-field"],
)
async def test_request_with_an_invalid_field_is_422(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    """wait_s outside 0..60 or not an integer, or an unknown field -> 422; nothing handed out."""
    token = await register_runner(client)
    job = await script_job(client)
    response = await anon.post(REQUEST, json=body, headers={"Authorization": f"Bearer {token}"})
    assert_error(response, 422)
    assert (await fetch_job(client, job["id"]))["runner_id"] is None


@pytest.mark.parametrize("content", [b"{", b"not json", b"\xff\xfe"], ids=["cut", "text", "utf8"])
async def test_request_with_a_malformed_body_is_400(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, content: bytes
) -> None:
    """A body that is not JSON -> 400."""
    token = await register_runner(client)
    response = await anon.post(
        REQUEST, content=content, headers={"Authorization": f"Bearer {token}"}
    )
    assert_error(response, 400)


# --- request: FIFO, tags, exactly once ---------------------------------------------------------


async def test_hand_out_is_oldest_pending_first(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, clock: Any
) -> None:
    """Jobs are handed out in the order they became pending, then 204."""
    token = await register_runner(client)
    ids = []
    for index in range(5):
        ids.append((await script_job(client, name=f"job-{index}"))["id"])
        clock.advance(1)
    handed = [(await claim(anon, token)).id for _ in ids]
    assert handed == ids
    assert (await request_job(anon, token)).status_code == 204


async def test_a_retry_queues_behind_older_pending_jobs(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, clock: Any
) -> None:
    """A retried job became pending last, so it is handed out after the jobs already waiting."""
    token = await register_runner(client)
    first = await script_job(client, name="first")
    handout = await claim_and_confirm(anon, token)
    await put_state(anon, handout, {"state": "failed", "exit_code": 1})
    clock.advance(1)
    waiting = await script_job(client, name="waiting")
    clock.advance(1)
    retried = (await client.post(f"/api/v1/jobs/{first['id']}/retry")).json()
    assert [(await claim(anon, token)).id for _ in range(2)] == [waiting["id"], retried["id"]]


async def test_tagged_jobs_go_to_runners_with_all_their_tags(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A job's tags must be a subset of the runner's; other jobs are left for other runners."""
    linux = await register_runner(client, tags=["linux"])
    linux_gpu = await register_runner(client, tags=["linux", "gpu"])
    gpu_job = await script_job(client, name="train", tags=["linux", "gpu"])
    linux_job = await script_job(client, name="lint", tags=["linux"])
    assert (await claim(anon, linux)).id == linux_job["id"]
    assert (await request_job(anon, linux)).status_code == 204
    assert (await claim(anon, linux_gpu)).id == gpu_job["id"]


async def test_untagged_jobs_only_go_to_runners_that_run_untagged(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """run_untagged false: untagged jobs are skipped; run_untagged true (default) takes them."""
    strict = await register_runner(client, tags=["linux"], run_untagged=False)
    relaxed = await register_runner(client, tags=["linux"])
    untagged = await script_job(client, name="untagged")
    tagged = await script_job(client, name="tagged", tags=["linux"])
    assert (await claim(anon, strict)).id == tagged["id"]
    assert (await request_job(anon, strict)).status_code == 204
    assert (await claim(anon, relaxed)).id == untagged["id"]


async def test_a_job_nobody_can_run_stays_pending(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A job whose tags no runner has is never handed out, and does not block younger jobs."""
    token = await register_runner(client, tags=["linux"])
    orphan = await script_job(client, name="orphan", tags=["windows"])
    runnable = await script_job(client, name="runnable")
    assert (await claim(anon, token)).id == runnable["id"]
    assert (await request_job(anon, token)).status_code == 204
    stored = await fetch_job(client, orphan["id"])
    assert stored["state"] == "pending" and stored["runner_id"] is None


async def test_two_runners_racing_over_30_jobs_get_each_exactly_once(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Many concurrent requests from two runners: every job is handed out once, to one runner."""
    tokens = [await register_runner(client), await register_runner(client)]
    created = {(await script_job(client, name=f"job-{i}"))["id"] for i in range(30)}
    handed: list[tuple[str, str]] = []

    async def poller(token: str) -> None:
        while True:
            response = await request_job(anon, token, wait_s=0)
            if response.status_code == 204:
                return
            assert response.status_code == 201, response.text
            handed.append((token, response.json()["id"]))

    await asyncio.gather(*(poller(tokens[i % 2]) for i in range(16)))
    ids = [job_id for _, job_id in handed]
    assert len(ids) == len(set(ids)) == 30
    assert set(ids) == created
    assert {token for token, _ in handed} == set(tokens)  # both runners took part
    runners = (await client.get("/api/v1/runners")).json()["items"]
    by_runner = {}
    for job_id in ids:
        by_runner.setdefault((await fetch_job(client, job_id))["runner_id"], []).append(job_id)
    assert set(by_runner) == {r["id"] for r in runners}


# --- long poll ---------------------------------------------------------------------------------


async def wait_until_polled(
    client: httpx.AsyncClient, runner_id: str, deadline_s: float = 5.0
) -> None:
    """Until the runner's request has looked at the queue once (its `last_seen_at` is set);
    a request that found nothing then waits on the wake-up before anything else runs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while loop.time() < deadline:
        runners = (await client.get("/api/v1/runners")).json()["items"]
        if any(r["id"] == runner_id and r["last_seen_at"] for r in runners):
            return
        await asyncio.sleep(0.01)  # polling with a deadline
    raise AssertionError("the long poll never looked at the queue")


async def test_long_poll_wakes_promptly_when_a_job_is_created(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A request waiting (wait_s=10) answers 201 well under 1 s after a job is created: it is
    woken by the commit, not by the 5 s recheck."""
    runner = await register(client)
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(request_job(anon, runner["token"], wait_s=10))
    await wait_until_polled(client, runner["id"])
    assert not waiting.done()
    created_at = loop.time()
    job = await script_job(client)
    response = await waiting
    latency = loop.time() - created_at
    assert response.status_code == 201, response.text
    assert response.json()["id"] == job["id"]
    assert latency < 1.0, latency


async def test_long_poll_wakes_when_a_pipeline_job_becomes_pending(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A job made pending by its need succeeding (a callback, not a creation) wakes the poll."""
    runner = await register(client)
    response = await client.post(
        "/api/v1/pipelines",
        json={
            "name": "p",
            "jobs": {
                "approve": {"kind": "external"},
                "deploy": {"needs": ["approve"], "script": ["true"]},
            },
        },
    )
    assert response.status_code == 201, response.text
    jobs = {job["name"]: job for job in response.json()["jobs"]}
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(request_job(anon, runner["token"], wait_s=10))
    await wait_until_polled(client, runner["id"])
    assert not waiting.done()
    started = loop.time()
    callback = await anon.post(jobs["approve"]["continue_url"].removeprefix(BASE_URL))
    assert callback.status_code == 200, callback.text
    answer = await waiting
    assert answer.status_code == 201
    assert answer.json()["id"] == jobs["deploy"]["id"]
    assert loop.time() - started < 1.0


# --- variables ---------------------------------------------------------------------------------


async def test_variables_follow_the_documented_precedence(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Later wins: pipeline variables < job variables < outputs of needs (in needs order) <
    predefined CI_JOB_ID, CI_JOB_NAME, CI_PIPELINE_ID; masked variables say masked: true."""
    token = await register_runner(client)
    response = await client.post(
        "/api/v1/pipelines",
        json={
            "name": "release",
            "variables": {
                "FROM_PIPELINE": "p",
                "JOB_OVERRIDES": "p",
                "NEED_OVERRIDES": "p",
                "CI_JOB_ID": "p",
                "PIPE_SECRET": {"value": "pipeline-secret-value", "masked": True},
            },
            "jobs": {
                "first": {"kind": "external"},
                "second": {"kind": "external"},
                "deploy": {
                    "needs": ["first", "second"],
                    "script": ["true"],
                    "variables": {
                        "JOB_OVERRIDES": "j",
                        "NEED_OVERRIDES": "j",
                        "CI_JOB_NAME": "j",
                        "JOB_SECRET": {"value": "job-secret-value", "masked": True},
                        "PLAIN_OBJECT": {"value": "shown"},
                    },
                },
            },
        },
    )
    assert response.status_code == 201, response.text
    pipeline = response.json()
    jobs = {job["name"]: job for job in pipeline["jobs"]}
    outputs = {
        "second": {"NEED_OVERRIDES": "second", "BOTH_NEEDS": "second", "CI_PIPELINE_ID": "n"},
        "first": {"NEED_OVERRIDES": "first", "BOTH_NEEDS": "first", "ONLY_FIRST": "first"},
    }
    for name, values in outputs.items():  # finish `second` first: needs order decides, not time
        done = await anon.post(
            jobs[name]["continue_url"].removeprefix(BASE_URL), json={"outputs": values}
        )
        assert done.status_code == 200, done.text
    handout = await claim(anon, token)
    assert handout.id == jobs["deploy"]["id"]
    assert handout.body["pipeline_id"] == pipeline["id"]
    keys = [v["key"] for v in handout.body["variables"]]
    assert len(keys) == len(set(keys))
    values = {key: (v["value"], v["masked"]) for key, v in handout.variables.items()}
    assert values == {
        "FROM_PIPELINE": ("p", False),
        "JOB_OVERRIDES": ("j", False),
        "NEED_OVERRIDES": ("second", False),
        "BOTH_NEEDS": ("second", False),
        "ONLY_FIRST": ("first", False),
        "PIPE_SECRET": ("pipeline-secret-value", True),
        "JOB_SECRET": ("job-secret-value", True),
        "PLAIN_OBJECT": ("shown", False),
        "CI_JOB_ID": (jobs["deploy"]["id"], False),
        "CI_JOB_NAME": ("deploy", False),
        "CI_PIPELINE_ID": (pipeline["id"], False),
    }


async def test_async_job_gets_a_masked_continue_url(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """An async job's hand-out carries CI_JOB_CONTINUE_URL, masked; a non-async one none; a
    standalone job's CI_PIPELINE_ID is empty."""
    token = await register_runner(client)
    plain = await script_job(client, name="plain")
    parked = await script_job(client, name="parked", **{"async": True})
    first, second = await claim(anon, token), await claim(anon, token)
    assert (first.id, second.id) == (plain["id"], parked["id"])
    assert "CI_JOB_CONTINUE_URL" not in first.variables
    assert first.variables["CI_PIPELINE_ID"]["value"] == ""
    assert second.body["async"] is True
    url = second.variables["CI_JOB_CONTINUE_URL"]
    assert url["masked"] is True
    peek = await anon.get(second.continue_path)
    assert peek.status_code == 200, peek.text
    assert peek.json()["job_id"] == parked["id"]


# --- confirm -----------------------------------------------------------------------------------


async def test_confirm_starts_the_job_and_is_an_idempotent_keepalive(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """PUT {"state": "running"} with the job token -> 200, running; again -> 200, one event."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim(anon, token)
    response = await put_state(anon, handout, {"state": "running"})
    assert response.status_code == 200, response.text
    assert response.json() == {"state": "running"}
    assert_job_status(response, "running")
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "running" and stored["started_at"] is not None
    again = await put_state(anon, handout, {"state": "running"})
    assert again.status_code == 200
    assert again.json() == {"state": "running"}
    assert_job_status(again, "running")
    assert await event_states(client, job["id"]) == ["pending", "running"]
    assert (await fetch_job(client, job["id"]))["started_at"] == stored["started_at"]


async def test_job_calls_with_a_wrong_or_missing_job_token(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A wrong job token (or another job's) -> 403, a missing one -> 401, on PUT and PATCH
    alike; the job is untouched."""
    token = await register_runner(client)
    job = await script_job(client, name="mine")
    await script_job(client, name="other")
    handout = await claim(anon, token)
    other = await claim(anon, token)
    for bad in ("gwj_wrong-token", other.token):
        assert_error(await put_state(anon, handout, {"state": "running"}, token=bad), 403)
        assert_error(await patch_trace(anon, handout, b"x", "0-0", token=bad), 403)
    missing = await anon.put(handout.path, json={"state": "running"})
    assert_error(missing, 401)
    missing = await anon.patch(
        f"{handout.path}/trace", content=b"x", headers={"Content-Range": "0-0"}
    )
    assert_error(missing, 401)
    unknown = await anon.put(
        "/api/v1/runner/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV",
        json={"state": "running"},
        headers={"Job-Token": handout.token},
    )
    assert_error(unknown, 403)
    assert (await fetch_job(client, job["id"]))["state"] == "pending"


@pytest.mark.parametrize(
    "body",
    [{"state": "waiting"}, {"state": "running", "extra": 1}, {"exit_code": 0}, {"state": 1}],
    ids=["bad-state", "unknown-field", "no-state", "state-not-a-string"],
)
async def test_update_with_an_invalid_body_is_422(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    """A PUT body of the wrong shape -> 422; the job is untouched."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim(anon, token)
    assert_error(await put_state(anon, handout, body), 422)
    assert (await fetch_job(client, job["id"]))["state"] == "pending"


async def test_update_with_a_malformed_body_is_400(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A PUT body that is not JSON -> 400."""
    token = await register_runner(client)
    await script_job(client)
    handout = await claim(anon, token)
    response = await anon.put(handout.path, content=b"{", headers={"Job-Token": handout.token})
    assert_error(response, 400)


async def test_exit_before_confirmation_is_409(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A job handed out but not confirmed cannot exit or take trace: 409, Job-Status: pending."""
    token = await register_runner(client)
    await script_job(client)
    handout = await claim(anon, token)
    response = await put_state(anon, handout, {"state": "success"})
    assert_error(response, 409)
    assert_job_status(response, "pending")
    response = await patch_trace(anon, handout, b"x", "0-0")
    assert_error(response, 409)
    assert_job_status(response, "pending")


# --- trace -------------------------------------------------------------------------------------


async def test_trace_appends_with_content_range(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """PATCH 0-4 -> 202 Range: 0-5; `bytes a-b` is accepted too; the trace reads back whole."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim_and_confirm(anon, token)
    first = await patch_trace(anon, handout, b"hello", "0-4")
    assert first.status_code == 202, first.text
    assert first.headers["Range"] == "0-5"
    assert_job_status(first, "running")
    second = await patch_trace(anon, handout, b" world\n", "bytes 5-11")
    assert second.status_code == 202, second.text
    assert second.headers["Range"] == "0-12"
    assert await fetch_trace(client, job["id"]) == "hello world\n"


@pytest.mark.parametrize(
    ("content_range", "data"),
    [("13-14", b"xy"), ("4-5", b"xy"), ("0-1", b"xy"), ("11-12", b"xy")],
    ids=["gap", "overlap", "from-start", "overlap-last-byte"],
)
async def test_trace_gap_or_overlap_is_416_with_the_current_size(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, content_range: str, data: bytes
) -> None:
    """A patch that does not start at the current size -> 416 with Range: 0-<size>; nothing is
    written, and a retry from the size given is taken."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim_and_confirm(anon, token)
    await append(anon, handout, b"hello world\n", 0)
    refused = await patch_trace(anon, handout, data, content_range)
    assert refused.status_code == 416, refused.text
    assert refused.headers["Range"] == "0-12"
    assert_job_status(refused, "running")
    await append(anon, handout, b"more\n", 12)
    assert await fetch_trace(client, job["id"]) == "hello world\nmore\n"


@pytest.mark.parametrize(
    "content_range",
    [None, "", "abc", "0-", "-4", "bytes=0-4", "0-4/5", "4-0", "0 - 4", "x0-4"],
    ids=[
        "missing",
        "empty",
        "text",
        "no-end",
        "no-start",
        "equals",
        "total",
        "reversed",
        "spaces",
        "prefix",
    ],
)
async def test_trace_without_a_valid_content_range_is_400(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, content_range: str | None
) -> None:
    """A missing or garbled Content-Range -> 400; nothing is written."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim_and_confirm(anon, token)
    assert_error(await patch_trace(anon, handout, b"hello", content_range), 400)
    assert await fetch_trace(client, job["id"]) == ""


@pytest.mark.parametrize("content_range", ["0-3", "0-5", "0-0"])
async def test_trace_length_mismatch_is_400(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, content_range: str
) -> None:
    """A Content-Range that announces another length than the body's -> 400; nothing written."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim_and_confirm(anon, token)
    assert_error(await patch_trace(anon, handout, b"hello", content_range), 400)
    assert await fetch_trace(client, job["id"]) == ""


async def test_masked_values_are_masked_when_the_trace_is_read(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Masked variables and the continue URL's token never come back from the trace, also when
    a runner split them across two PATCHes; offsets count the bytes the runner sent."""
    token = await register_runner(client)
    secret = "s3cret-value-42"
    job = await script_job(
        client, variables={"SECRET": {"value": secret, "masked": True}}, **{"async": True}
    )
    handout = await claim_and_confirm(anon, token)
    url = handout.variables["CI_JOB_CONTINUE_URL"]["value"]
    continue_token = url.rsplit("/", 1)[1]
    raw = f"secret={secret}\nurl={url}\nbye\n".encode()
    cut_secret = raw.index(secret.encode()) + 4
    cut_url = raw.index(continue_token.encode()) + 10
    await append(anon, handout, raw[:cut_secret], 0)
    await append(anon, handout, raw[cut_secret:cut_url], cut_secret)
    await append(anon, handout, raw[cut_url:], cut_url)
    trace = await fetch_trace(client, job["id"])
    assert secret not in trace
    assert continue_token not in trace
    assert trace == f"secret=[MASKED]\nurl={BASE_URL}/continue/[MASKED]\nbye\n"
    # the tail read from an offset in the middle of a secret shows no piece of it either
    tail = await client.get(f"/api/v1/jobs/{job['id']}/trace", params={"offset": cut_secret})
    assert secret[4:] not in tail.text


async def test_masked_pipeline_variables_are_masked_when_the_trace_is_read(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A masked pipeline variable is masked in the traces of the pipeline's jobs too."""
    token = await register_runner(client)
    secret = "pipeline-wide-secret"
    response = await client.post(
        "/api/v1/pipelines",
        json={
            "name": "p",
            "variables": {"DEPLOY_KEY": {"value": secret, "masked": True}},
            "jobs": {"build": {"script": ["echo $DEPLOY_KEY"]}},
        },
    )
    assert response.status_code == 201, response.text
    handout = await claim_and_confirm(anon, token)
    await append(anon, handout, f"key={secret}\n".encode(), 0)
    assert await fetch_trace(client, handout.id) == "key=[MASKED]\n"


# --- exit --------------------------------------------------------------------------------------


async def test_exit_success_finishes_the_job(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """PUT {"state": "success"} -> 200 {"state": "success"}, Job-Status: success; exit_code 0."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim_and_confirm(anon, token)
    response = await put_state(anon, handout, {"state": "success", "exit_code": 0})
    assert response.status_code == 200, response.text
    assert response.json() == {"state": "success"}
    assert_job_status(response, "success")
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "success"
    assert stored["exit_code"] == 0
    assert stored["failure_reason"] is None
    assert stored["finished_at"] is not None and stored["deadline_at"] is None
    assert await event_states(client, job["id"]) == ["pending", "running", "success"]


async def test_exit_failed_is_a_script_failure_with_its_exit_code(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """PUT {"state": "failed", "exit_code": 3} -> failed, script_failure, exit_code 3."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim_and_confirm(anon, token)
    response = await put_state(anon, handout, {"state": "failed", "exit_code": 3})
    assert response.status_code == 200, response.text
    assert response.json() == {"state": "failed"}
    assert_job_status(response, "failed")
    stored = await fetch_job(client, job["id"])
    assert (stored["state"], stored["failure_reason"], stored["exit_code"]) == (
        "failed",
        "script_failure",
        3,
    )


@pytest.mark.parametrize("reason", ["job_execution_timeout", "runner_system_failure"])
async def test_runner_may_report_its_own_failure_reasons(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, reason: str
) -> None:
    """A runner may say the script failed by its timeout kill or its own failure."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim_and_confirm(anon, token)
    body = {"state": "failed", "exit_code": 143, "failure_reason": reason}
    response = await put_state(anon, handout, body)
    assert response.status_code == 200, response.text
    stored = await fetch_job(client, job["id"])
    assert (stored["state"], stored["failure_reason"]) == ("failed", reason)


@pytest.mark.parametrize(
    "body",
    [
        {"state": "failed", "exit_code": 1, "failure_reason": "callback_timeout"},
        {"state": "failed", "exit_code": 1, "failure_reason": "queue_timeout"},
        {"state": "failed", "exit_code": 1, "failure_reason": "heartbeat_timeout"},
        {"state": "failed", "exit_code": 1, "failure_reason": "callback_failure"},
        {"state": "failed", "exit_code": 1, "failure_reason": "bogus"},
        {"state": "success", "exit_code": 1},
        {"state": "success", "failure_reason": "script_failure"},
        {"state": "failed", "exit_code": "1"},
        {"state": "failed", "exit_code": 2**40},
    ],
    ids=[
        "callback_timeout",
        "queue_timeout",
        "heartbeat_timeout",
        "callback_failure",
        "unknown-reason",
        "success-nonzero",
        "success-with-reason",
        "exit-code-string",
        "exit-code-huge",
    ],
)
async def test_exit_with_an_invalid_report_is_422(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    """Reasons a runner cannot know, contradictions and wrong types -> 422; the job runs on."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim_and_confirm(anon, token)
    assert_error(await put_state(anon, handout, body), 422)
    assert (await fetch_job(client, job["id"]))["state"] == "running"


async def test_async_job_exiting_0_parks_with_its_continue_url_live(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """An async job's exit 0 -> 200 {"state": "waiting"}, parked_at set; its continue URL then
    finishes it."""
    token = await register_runner(client)
    job = await script_job(client, **{"async": True})
    handout = await claim_and_confirm(anon, token)
    response = await put_state(anon, handout, {"state": "success", "exit_code": 0})
    assert response.status_code == 200, response.text
    assert response.json() == {"state": "waiting"}
    assert_job_status(response, "waiting")
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "waiting"
    assert stored["parked_at"] is not None and stored["finished_at"] is None
    peek = await anon.get(handout.continue_path)
    assert peek.status_code == 200 and peek.json()["state"] == "waiting"
    done = await anon.post(handout.continue_path, json={"outputs": {"HOST": "h1"}})
    assert done.status_code == 200, done.text
    assert done.json() == {"job_id": job["id"], "state": "success"}
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "success" and stored["outputs"] == {"HOST": "h1"}


async def test_async_job_failing_never_parks(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """An async job whose script fails is failed at once; its continue URL is dead (409)."""
    token = await register_runner(client)
    job = await script_job(client, **{"async": True})
    handout = await claim_and_confirm(anon, token)
    response = await put_state(anon, handout, {"state": "failed", "exit_code": 2})
    assert response.status_code == 200 and response.json() == {"state": "failed"}
    late = await anon.post(handout.continue_path, json={})
    assert_error(late, 409, "already_final")
    assert (await fetch_job(client, job["id"]))["failure_reason"] == "script_failure"


@pytest.mark.parametrize("final", ["success", "failed", "canceled"])
async def test_calls_on_a_terminal_job_are_409_with_job_status(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, final: str
) -> None:
    """After the job ended, an exit, a keepalive and a trace append -> 409 with Job-Status."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim_and_confirm(anon, token)
    if final == "canceled":
        assert (await client.post(f"/api/v1/jobs/{job['id']}/cancel")).status_code == 200
    else:
        body = {"state": final, "exit_code": 0 if final == "success" else 1}
        assert (await put_state(anon, handout, body)).status_code == 200
    for response in (
        await put_state(anon, handout, {"state": "success"}),
        await put_state(anon, handout, {"state": "failed", "exit_code": 1}),
        await put_state(anon, handout, {"state": "running"}),
        await patch_trace(anon, handout, b"late", "0-3"),
    ):
        assert_error(response, 409)
        assert_job_status(response, final)
    assert (await fetch_job(client, job["id"]))["state"] == final


# --- cancel reaches the runner -----------------------------------------------------------------


async def test_cancel_reaches_the_runner_through_job_status(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Cancelling a running job through the API: the runner's next PUT or PATCH gets 409 with
    Job-Status: canceled; the trace keeps what was sent before."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim_and_confirm(anon, token)
    await append(anon, handout, b"working\n", 0)
    canceled = await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["state"] == "canceled"
    keepalive = await put_state(anon, handout, {"state": "running"})
    assert_error(keepalive, 409)
    assert_job_status(keepalive, "canceled")
    patch = await patch_trace(anon, handout, b"more\n", "8-12")
    assert_error(patch, 409)
    assert_job_status(patch, "canceled")
    assert await fetch_trace(client, job["id"]) == "working\n"
    assert (await fetch_job(client, job["id"]))["state"] == "canceled"


async def test_a_job_canceled_before_confirmation_is_not_started(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A hand-out canceled before its confirmation: the confirm gets 409 Job-Status: canceled."""
    token = await register_runner(client)
    job = await script_job(client)
    handout = await claim(anon, token)
    assert (await client.post(f"/api/v1/jobs/{job['id']}/cancel")).status_code == 200
    response = await put_state(anon, handout, {"state": "running"})
    assert_error(response, 409)
    assert_job_status(response, "canceled")


# --- early callback ----------------------------------------------------------------------------


async def test_early_callback_is_kept_and_applied_on_exit_0(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A terminal call while the async job runs -> 202, the job runs on; its exact repeat ->
    202, a different call -> 409; exit 0 applies it at once: success with its outputs, events
    running -> waiting -> success."""
    token = await register_runner(client)
    job = await script_job(client, **{"async": True})
    handout = await claim_and_confirm(anon, token)
    body = {"outputs": {"IP": "10.0.0.7"}, "message": "provisioned", "result": {"n": 1}}
    early = await anon.post(handout.continue_path, json=body)
    assert early.status_code == 202, early.text
    assert early.json() == {"job_id": job["id"], "state": "running"}
    assert (await fetch_job(client, job["id"]))["state"] == "running"
    repeat = await anon.post(handout.continue_path, json=body)
    assert repeat.status_code == 202 and repeat.json() == early.json()
    different = await anon.post(handout.continue_path, json={"status": "failed"})
    assert different.status_code == 409, different.text
    assert (await fetch_job(client, job["id"]))["state"] == "running"
    keepalive = await put_state(anon, handout, {"state": "running"})
    assert keepalive.status_code == 200  # the runner is not told anything happened
    exited = await put_state(anon, handout, {"state": "success", "exit_code": 0})
    assert exited.status_code == 200, exited.text
    assert exited.json() == {"state": "success"}
    assert_job_status(exited, "success")
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "success"
    assert stored["outputs"] == {"IP": "10.0.0.7"}
    assert stored["message"] == "provisioned"
    assert stored["result"] == {"n": 1}
    assert stored["parked_at"] is not None
    assert await event_states(client, job["id"]) == ["pending", "running", "waiting", "success"]
    replay = await anon.post(handout.continue_path, json=body)
    assert replay.status_code == 200 and replay.json() == {"job_id": job["id"], "state": "success"}


async def test_early_failed_callback_is_applied_on_exit_0(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """An early call saying the external work failed fails the job (callback_failure) on exit 0."""
    token = await register_runner(client)
    job = await script_job(client, **{"async": True})
    handout = await claim_and_confirm(anon, token)
    early = await anon.post(handout.continue_path, json={"status": "failed", "message": "no"})
    assert early.status_code == 202, early.text
    exited = await put_state(anon, handout, {"state": "success"})
    assert exited.json() == {"state": "failed"}
    stored = await fetch_job(client, job["id"])
    assert (stored["state"], stored["failure_reason"]) == ("failed", "callback_failure")


async def test_script_failure_wins_over_an_early_callback(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """An early success call, then the script fails: the job fails with script_failure, without
    the call's outputs; the early caller's repeat then gets 409 already_final."""
    token = await register_runner(client)
    job = await script_job(client, **{"async": True})
    handout = await claim_and_confirm(anon, token)
    body = {"outputs": {"IP": "10.0.0.7"}}
    assert (await anon.post(handout.continue_path, json=body)).status_code == 202
    exited = await put_state(anon, handout, {"state": "failed", "exit_code": 1})
    assert exited.status_code == 200 and exited.json() == {"state": "failed"}
    stored = await fetch_job(client, job["id"])
    assert (stored["state"], stored["failure_reason"]) == ("failed", "script_failure")
    assert stored["outputs"] == {}
    repeat = await anon.post(handout.continue_path, json=body)
    refused = assert_error(repeat, 409, "already_final")
    assert (refused["state"], refused["failure_reason"]) == ("failed", "script_failure")


async def test_an_early_callback_overridden_by_a_cancel_is_not_replayed(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """An early call kept on a job that is then canceled finished nothing: its repeat gets 409
    already_final (canceled), not a replay."""
    token = await register_runner(client)
    job = await script_job(client, **{"async": True})
    handout = await claim_and_confirm(anon, token)
    assert (await anon.post(handout.continue_path, json={})).status_code == 202
    assert (await client.post(f"/api/v1/jobs/{job['id']}/cancel")).status_code == 200
    refused = assert_error(await anon.post(handout.continue_path, json={}), 409, "already_final")
    assert (refused["state"], refused["failure_reason"]) == ("canceled", None)


async def test_early_callback_during_the_hand_out_is_kept_too(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A call on the continue URL before the runner confirmed (the job still pending) -> 202;
    it is applied when the confirmed script exits 0."""
    token = await register_runner(client)
    job = await script_job(client, **{"async": True})
    handout = await claim(anon, token)
    early = await anon.post(handout.continue_path, json={"outputs": {"A": "1"}})
    assert early.status_code == 202, early.text
    assert early.json()["state"] == "pending"
    await confirm(anon, handout)
    exited = await put_state(anon, handout, {"state": "success"})
    assert exited.json() == {"state": "success"}
    assert (await fetch_job(client, job["id"]))["outputs"] == {"A": "1"}


async def test_early_callback_outputs_reach_the_downstream_job(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Outputs of an early call applied on exit 0 become variables of the job that needs it."""
    token = await register_runner(client)
    response = await client.post(
        "/api/v1/pipelines",
        json={
            "name": "provision",
            "jobs": {
                "provision": {"script": ["true"], "async": True},
                "deploy": {"script": ["true"], "needs": ["provision"]},
            },
        },
    )
    assert response.status_code == 201, response.text
    upstream = await claim_and_confirm(anon, token)
    assert (await request_job(anon, token)).status_code == 204  # deploy waits for its need
    assert (
        await anon.post(upstream.continue_path, json={"outputs": {"IP": "1.2.3.4"}})
    ).status_code == 202
    assert (await put_state(anon, upstream, {"state": "success"})).json() == {"state": "success"}
    downstream = await claim(anon, token)
    assert downstream.body["name"] == "deploy"
    assert downstream.variables["IP"] == {"key": "IP", "value": "1.2.3.4", "masked": False}


# --- Job-Status on every answer about a job ----------------------------------------------------


async def test_every_runner_answer_about_a_job_carries_job_status(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """201, 200, 202, 416 and 409 answers of the runner routes all carry Job-Status, naming the
    job's state at that moment."""
    token = await register_runner(client)
    await script_job(client, **{"async": True})
    seen: list[tuple[int, str]] = []

    def record(response: httpx.Response) -> httpx.Response:
        assert "Job-Status" in response.headers, (response.status_code, response.text)
        seen.append((response.status_code, response.headers["Job-Status"]))
        return response

    handout = HandOut(record(await request_job(anon, token)).json())
    record(await patch_trace(anon, handout, b"x", "0-0"))  # 409 before confirmation
    record(await put_state(anon, handout, {"state": "running"}))
    record(await put_state(anon, handout, {"state": "running"}))
    record(await patch_trace(anon, handout, b"abc", "0-2"))
    record(await patch_trace(anon, handout, b"abc", "0-2"))  # 416
    record(await put_state(anon, handout, {"state": "success"}))
    record(await put_state(anon, handout, {"state": "success"}))  # 409 on a waiting job
    assert seen == [
        (201, "pending"),
        (409, "pending"),
        (200, "running"),
        (200, "running"),
        (202, "running"),
        (416, "running"),
        (200, "waiting"),
        (409, "waiting"),
    ]


# --- the reference runner, in process ----------------------------------------------------------


async def wait_for_state(
    client: httpx.AsyncClient, job_id: str, states: set[str], deadline_s: float = 30.0
) -> dict[str, Any]:
    """Poll the job until its state is one of `states` (with a deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        job = await fetch_job(client, job_id)
        if job["state"] in states:
            return job
        if loop.time() > deadline:
            raise AssertionError(f"job {job_id} stuck in {job['state']}")
        await asyncio.sleep(0.05)  # polling with a deadline


async def test_reference_runner_runs_a_script_job_and_an_async_job(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, tmp_path: Path
) -> None:
    """The reference runner, driven in process against the real app, runs real bash: a script
    job ends success with its output (masked) in the trace; an async job parks in waiting with
    its continue URL never in the trace, and the callback finishes it with its outputs."""
    token = await register_runner(client)
    secret = "runner-secret-4711"
    url_file = tmp_path / "continue-url"
    script = await script_job(
        client,
        name="build",
        script=["echo hello from $CI_JOB_NAME", 'echo "the secret is $SECRET"', "echo done >&2"],
        variables={"SECRET": {"value": secret, "masked": True}},
    )
    failing = await script_job(client, name="broken", script=["echo about to fail", "exit 7"])
    parked = await script_job(
        client,
        name="provision",
        script=[
            'echo "calling back at $CI_JOB_CONTINUE_URL"',
            f'printf %s "$CI_JOB_CONTINUE_URL" > {url_file}',
            "echo handed off",
        ],
        **{"async": True},
    )
    runner = Runner(
        BASE_URL,
        token,
        transport=httpx.ASGITransport(app=app),
        concurrency=2,
        poll_wait_s=1,
        kill_grace_s=0.5,
        shutdown_grace_s=1,
        backoff_cap_s=0.5,
        trace_interval_s=0.1,
        builds_dir=tmp_path,
        parent_env={"PATH": os.environ["PATH"]},
    )
    running = asyncio.create_task(runner.run())
    try:
        done = await wait_for_state(client, script["id"], {"success", "failed"})
        broken = await wait_for_state(client, failing["id"], {"success", "failed"})
        waiting = await wait_for_state(client, parked["id"], {"waiting", "failed"})
    finally:
        runner.stop()
        await asyncio.wait_for(running, timeout=20)

    assert (done["state"], done["exit_code"]) == ("success", 0)
    trace = await fetch_trace(client, script["id"])
    assert "hello from build\n" in trace
    assert "the secret is [MASKED]\n" in trace
    assert "done\n" in trace
    assert secret not in trace

    assert (broken["state"], broken["failure_reason"], broken["exit_code"]) == (
        "failed",
        "script_failure",
        7,
    )
    assert "about to fail\n" in await fetch_trace(client, failing["id"])

    assert waiting["state"] == "waiting", waiting
    continue_url = url_file.read_text()
    assert continue_url.startswith(f"{BASE_URL}/continue/")
    parked_trace = await fetch_trace(client, parked["id"])
    assert "calling back at [MASKED]\n" in parked_trace  # the runner masked the whole URL
    assert continue_url.rsplit("/", 1)[1] not in parked_trace
    assert "handed off\n" in parked_trace
    finished = await anon.post(
        continue_url.removeprefix(BASE_URL), json={"outputs": {"HOST": "node-1"}}
    )
    assert finished.status_code == 200, finished.text
    stored = await fetch_job(client, parked["id"])
    assert (stored["state"], stored["outputs"]) == ("success", {"HOST": "node-1"})
    assert await event_states(client, parked["id"]) == ["pending", "running", "waiting", "success"]


async def test_progress_calls_before_the_async_script_exits_are_409_not_parked(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """start, heartbeat and log on the URL of an async job whose script still runs answer 409
    not_parked (retry later) and change nothing; once the job parks they work."""
    token = await register_runner(client)
    job = await script_job(client, **{"async": True})
    handout = await claim_and_confirm(anon, token)
    url = next(v["value"] for v in handout.body["variables"] if v["key"] == "CI_JOB_CONTINUE_URL")
    path = url.removeprefix(BASE_URL)
    for call in ("start", "heartbeat", "log"):
        response = await anon.post(f"{path}/{call}", content=b"early")
        body = assert_error(response, 409, "not_parked")
        assert body["state"] == "running"
    assert await event_states(client, job["id"]) == ["pending", "running"]
    await put_state(anon, handout, {"state": "success", "exit_code": 0})
    assert (await anon.post(f"{path}/log", content=b"now")).status_code == 200
    assert (await anon.post(f"{path}/start")).json()["state"] == "waiting"
