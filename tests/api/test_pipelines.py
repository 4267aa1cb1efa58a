"""Pipelines over the real app (PRODUCT.md "POST /api/v1/pipelines", "Pipeline state"): creation
and its 422s, needs gating and skipping, the derived state through whole runs, cancel, retry
reopening skipped jobs, outputs becoming variables, and listing.

Script jobs are driven through the runner API (register, request, confirm, exit); external jobs
through their continue URLs.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.clock import ManualClock, rfc3339
from gateway.models import MAX_PIPELINE_JOBS
from tests.conftest import BASE_URL, continue_path, sweep

SCRIPT = {"script": ["true"]}
EXTERNAL = {"kind": "external"}


# --- helpers -----------------------------------------------------------------------------


async def create_pipeline(
    client: httpx.AsyncClient, jobs: dict[str, dict[str, Any]], **fields: Any
) -> dict[str, Any]:
    """Create a pipeline and return its JSON, asserting 201."""
    response = await client.post("/api/v1/pipelines", json={"name": "p", **fields, "jobs": jobs})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def get_pipeline(client: httpx.AsyncClient, pipeline_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/pipelines/{pipeline_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def by_name(pipeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["name"]: job for job in pipeline["jobs"]}


async def states(client: httpx.AsyncClient, pipeline_id: str) -> tuple[str, dict[str, str]]:
    """The pipeline's state and each (latest) job's state."""
    pipeline = await get_pipeline(client, pipeline_id)
    return pipeline["state"], {job["name"]: job["state"] for job in pipeline["jobs"]}


async def register_runner(client: httpx.AsyncClient, **fields: Any) -> str:
    response = await client.post("/api/v1/runners", json=fields)
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


async def request_job(client: httpx.AsyncClient, runner_token: str) -> dict[str, Any] | None:
    """One hand-out (no long poll), or None when nothing is pending."""
    response = await client.post(
        "/api/v1/runner/jobs/request",
        json={"wait_s": 0},
        headers={"Authorization": f"Bearer {runner_token}"},
    )
    if response.status_code == 204:
        return None
    assert response.status_code == 201, response.text
    handout: dict[str, Any] = response.json()
    return handout


async def runner_put(
    client: httpx.AsyncClient, handout: dict[str, Any], **body: Any
) -> httpx.Response:
    return await client.put(
        f"/api/v1/runner/jobs/{handout['id']}",
        json=body,
        headers={"Job-Token": handout["token"]},
    )


async def start_script(client: httpx.AsyncClient, runner_token: str, name: str) -> dict[str, Any]:
    """Take the next hand-out (which must be job `name`) and confirm it: the job is running."""
    handout = await request_job(client, runner_token)
    assert handout is not None, f"expected {name} to be handed out"
    assert handout["name"] == name
    response = await runner_put(client, handout, state="running")
    assert response.status_code == 200, response.text
    assert response.json() == {"state": "running"}
    return handout


async def exit_script(
    client: httpx.AsyncClient, handout: dict[str, Any], *, exit_code: int = 0
) -> str:
    """Report the script's exit; the job's state after it."""
    if exit_code == 0:
        response = await runner_put(client, handout, state="success", exit_code=0)
    else:
        response = await runner_put(client, handout, state="failed", exit_code=exit_code)
    assert response.status_code == 200, response.text
    state: str = response.json()["state"]
    return state


async def run_script(
    client: httpx.AsyncClient, runner_token: str, name: str, *, exit_code: int = 0
) -> dict[str, Any]:
    """Hand out, confirm and finish script job `name`; its hand-out."""
    handout = await start_script(client, runner_token, name)
    await exit_script(client, handout, exit_code=exit_code)
    return handout


async def finish(anon: httpx.AsyncClient, job: dict[str, Any], **body: Any) -> httpx.Response:
    """The terminal call on a job's continue URL (as returned at creation or retry)."""
    return await anon.post(continue_path(job), json=body)


def variables_of(handout: dict[str, Any]) -> dict[str, str]:
    return {v["key"]: v["value"] for v in handout["variables"]}


@pytest.fixture
async def runner(client: httpx.AsyncClient) -> str:
    """A registered runner's token (untagged jobs)."""
    return await register_runner(client, description="test runner")


# --- creation ----------------------------------------------------------------------------


async def test_create_answers_jobs_in_definition_order(client: httpx.AsyncClient) -> None:
    """201 with id, state and every job in definition order: jobs without needs pending, the
    others created, each external job with a continue URL (script jobs without)."""
    body = await create_pipeline(
        client,
        {
            "build": SCRIPT,
            "approve": {**EXTERNAL, "needs": ["build"]},
            "deploy": {**SCRIPT, "needs": ["approve", "build"]},
            "gate": EXTERNAL,
            "lint": {"script": ["ruff check ."], "tags": []},
        },
        name="release",
        variables={"REGION": "eu"},
    )
    assert body["id"]
    assert body["name"] == "release"
    assert body["state"] == "pending"
    assert body["variables"] == {"REGION": "eu"}
    assert [job["name"] for job in body["jobs"]] == ["build", "approve", "deploy", "gate", "lint"]
    jobs = by_name(body)
    assert {name: job["state"] for name, job in jobs.items()} == {
        "build": "pending",
        "approve": "created",
        "deploy": "created",
        "gate": "pending",
        "lint": "pending",
    }
    assert {name for name, job in jobs.items() if "continue_url" in job} == {"approve", "gate"}
    assert jobs["approve"]["continue_url"].startswith(f"{BASE_URL}/continue/")
    assert jobs["approve"]["kind"] == "external"
    assert jobs["build"]["kind"] == "script"  # the default kind in a pipeline
    assert jobs["deploy"]["needs"] == ["approve", "build"]
    for job in body["jobs"]:
        assert job["pipeline_id"] == body["id"]
        assert job["attempt"] == 1
        assert job["retry_of"] is None
    assert jobs["approve"]["deadline_at"] is None  # its clocks start once it is pending
    assert jobs["gate"]["deadline_at"] is not None


async def test_get_never_shows_continue_urls(client: httpx.AsyncClient) -> None:
    """GET /api/v1/pipelines/{id} shows the same jobs, but no continue URL."""
    body = await create_pipeline(client, {"gate": EXTERNAL, "after": {**SCRIPT, "needs": ["gate"]}})
    shown = await get_pipeline(client, body["id"])
    assert [job["id"] for job in shown["jobs"]] == [job["id"] for job in body["jobs"]]
    assert "continue_url" not in shown["jobs"][0]
    assert "token" not in str(shown)


async def test_unknown_pipeline_is_404(client: httpx.AsyncClient) -> None:
    """Reading or canceling a pipeline that does not exist is 404 JSON."""
    for response in (
        await client.get("/api/v1/pipelines/01ARZ3NDEKTSV4RRFFQ69G5FAV"),
        await client.post("/api/v1/pipelines/01ARZ3NDEKTSV4RRFFQ69G5FAV/cancel"),
    ):
        assert response.status_code == 404
        assert response.json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("jobs", "culprits"),
    [
        ({"build": SCRIPT, "deploy": {**SCRIPT, "needs": ["biuld"]}}, ["`deploy`", "`biuld`"]),
        (
            {"a": {**SCRIPT, "needs": ["b"]}, "b": {**SCRIPT, "needs": ["a"]}},
            ["cycle", "`a`", "`b`"],
        ),
        (
            {
                "root": SCRIPT,
                "x": {**SCRIPT, "needs": ["root", "z"]},
                "y": {**SCRIPT, "needs": ["x"]},
                "z": {**SCRIPT, "needs": ["y"]},
            },
            ["cycle", "`x`", "`y`", "`z`"],
        ),
        ({"a": SCRIPT, "b": {**SCRIPT, "needs": ["a", "a"]}}, ["`b`", "`a`", "twice"]),
        ({"a": {**SCRIPT, "needs": ["a"]}}, ["`a`", "itself"]),
        ({"ok": SCRIPT, "broken": {"needs": ["ok"]}}, ["`broken`", "`script`"]),
        ({"ok": SCRIPT, "broken": {"script": []}}, ["`broken`", "`script`"]),
        ({"ext": {**EXTERNAL, "script": ["x"]}}, ["`ext`", "`script`"]),
        ({"ext": {**EXTERNAL, "async": True}}, ["`ext`", "`async`"]),
        ({"a": {**SCRIPT, "stage": "test"}}, ["`stage`"]),
        ({"a": {**SCRIPT, "timeout_s": 0}}, ["timeout_s"]),
        ({"a": {**SCRIPT, "needs": "b"}}, ["needs"]),
        ({"bad name!": SCRIPT}, ["jobs"]),
        ({}, ["at least one job"]),
    ],
    ids=[
        "unknown-need",
        "cycle-2",
        "cycle-3",
        "duplicate-need",
        "self-need",
        "script-job-without-script",
        "empty-script",
        "external-with-script",
        "external-async",
        "unknown-job-field",
        "zero-timeout",
        "needs-not-a-list",
        "bad-job-name",
        "no-jobs",
    ],
)
async def test_invalid_pipelines_are_422_naming_the_culprit(
    client: httpx.AsyncClient, jobs: dict[str, Any], culprits: list[str]
) -> None:
    """Each invalid pipeline is refused with 422 whose detail names the culprit, and nothing
    is created."""
    response = await client.post("/api/v1/pipelines", json={"name": "p", "jobs": jobs})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid"
    for culprit in culprits:
        assert culprit in body["detail"], (culprit, body["detail"])
    listed = await client.get("/api/v1/pipelines")
    assert listed.json()["items"] == []
    assert (await client.get("/api/v1/jobs")).json()["items"] == []


async def test_long_chain_of_needs_is_accepted_up_to_the_job_limit(
    client: httpx.AsyncClient,
) -> None:
    """A chain of MAX_PIPELINE_JOBS jobs defined from its end is created (the DAG check walks
    without recursion); one job more is refused with 422 naming the limit."""
    length = MAX_PIPELINE_JOBS
    jobs = {
        f"j{i}": {**SCRIPT, "needs": [f"j{i - 1}"]} if i else SCRIPT
        for i in reversed(range(length))
    }
    body = await create_pipeline(client, jobs)
    assert len(body["jobs"]) == length
    assert by_name(body)["j0"]["state"] == "pending"
    assert by_name(body)[f"j{length - 1}"]["state"] == "created"
    cyclic = {**jobs, "j0": {**SCRIPT, "needs": [f"j{length - 1}"]}}
    response = await client.post("/api/v1/pipelines", json={"name": "p", "jobs": cyclic})
    assert response.status_code == 422
    assert "cycle" in response.json()["detail"]
    too_many = {**jobs, "extra": SCRIPT}
    response = await client.post("/api/v1/pipelines", json={"name": "p", "jobs": too_many})
    assert response.status_code == 422
    assert "jobs" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"name": "p", "jobs": {"a": SCRIPT}, "colour": "red"}, 422),
        ({"jobs": {"a": SCRIPT}}, 422),
        ({"name": "p", "jobs": ["a"]}, 422),
        ({"name": "p", "jobs": {"a": SCRIPT}, "variables": {"1BAD": "x"}}, 422),
        (None, 422),
    ],
    ids=["unknown-field", "no-name", "jobs-not-a-map", "bad-variable-name", "null"],
)
async def test_invalid_pipeline_bodies(client: httpx.AsyncClient, body: Any, status: int) -> None:
    """Unknown top-level fields and wrong shapes are refused with a JSON error, not a 500."""
    response = await client.post("/api/v1/pipelines", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == "invalid"


async def test_unknown_top_level_field_is_named(client: httpx.AsyncClient) -> None:
    """An unknown field is named in the 422's detail."""
    response = await client.post(
        "/api/v1/pipelines", json={"name": "p", "jobs": {"a": SCRIPT}, "stages": ["build"]}
    )
    assert response.status_code == 422
    assert "stages" in response.json()["detail"]


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    """A body that is not JSON is 400 malformed."""
    response = await client.post("/api/v1/pipelines", content=b"{jobs:")
    assert response.status_code == 400
    assert response.json()["error"] == "malformed"


async def test_pipelines_need_an_api_token(
    anon: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    """Every pipeline route is 401 without a token."""
    body = await create_pipeline(client, {"a": SCRIPT})
    for response in (
        await anon.post("/api/v1/pipelines", json={"name": "p", "jobs": {"a": SCRIPT}}),
        await anon.get("/api/v1/pipelines"),
        await anon.get(f"/api/v1/pipelines/{body['id']}"),
        await anon.post(f"/api/v1/pipelines/{body['id']}/cancel"),
    ):
        assert response.status_code == 401


# --- needs gate external jobs ------------------------------------------------------------


async def test_external_url_is_not_ready_until_needs_are_met(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, runner: str
) -> None:
    """An external job's URL answers 409 not_ready (and is not consumed) while it is created;
    once its needs succeeded the same URL works."""
    body = await create_pipeline(
        client, {"build": SCRIPT, "approve": {**EXTERNAL, "needs": ["build"]}}
    )
    approve = by_name(body)["approve"]
    path = continue_path(approve)
    for response in (
        await anon.post(path, json={}),
        await anon.post(path, json={"status": "failed"}),
        await anon.post(f"{path}/start"),
        await anon.post(f"{path}/heartbeat"),
        await anon.post(f"{path}/log", content=b"early"),
    ):
        assert response.status_code == 409, response.text
        assert response.json()["error"] == "not_ready"
        assert response.json()["state"] == "created"
    assert (await client.get(f"/api/v1/jobs/{approve['id']}/trace")).text == ""
    peek = await anon.get(path)
    assert peek.status_code == 200
    assert peek.json() == {"job_id": approve["id"], "state": "created", "deadline_at": None}
    assert (await states(client, body["id"]))[1]["approve"] == "created"

    await run_script(client, runner, "build")
    assert (await states(client, body["id"]))[1]["approve"] == "pending"
    response = await anon.post(path, json={"outputs": {"APPROVER": "ops"}})
    assert response.status_code == 200, response.text
    assert response.json() == {"job_id": approve["id"], "state": "success"}
    assert await states(client, body["id"]) == (
        "success",
        {"build": "success", "approve": "success"},
    )


async def test_external_deadlines_start_when_it_becomes_pending(
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    runner: str,
    clock: ManualClock,
    app: Starlette,
) -> None:
    """A created external job has no deadline; its callback timeout counts from the moment
    its needs are met, and firing it fails the job and skips its downstream."""
    body = await create_pipeline(
        client,
        {
            "build": SCRIPT,
            "approve": {**EXTERNAL, "needs": ["build"], "callback_timeout_s": 600},
            "deploy": {**SCRIPT, "needs": ["approve"]},
        },
    )
    approve_id = by_name(body)["approve"]["id"]
    clock.advance(5000)  # far past the callback timeout, counted from creation
    assert await sweep(app) == 0
    build = await start_script(client, runner, "build")
    clock.advance(100)
    await exit_script(client, build)
    became_pending = clock.now()
    approve = (await client.get(f"/api/v1/jobs/{approve_id}")).json()
    assert approve["state"] == "pending"
    assert approve["deadline_at"] == rfc3339(became_pending + 600)
    assert (await anon.get(continue_path(by_name(body)["approve"]))).json()["deadline_at"] == (
        rfc3339(became_pending + 600)
    )

    clock.advance(599)
    assert await sweep(app) == 0
    assert (await states(client, body["id"]))[1]["approve"] == "pending"
    clock.advance(2)
    assert await sweep(app) == 1
    approve = (await client.get(f"/api/v1/jobs/{approve_id}")).json()
    assert (approve["state"], approve["failure_reason"]) == ("failed", "callback_timeout")
    assert await states(client, body["id"]) == (
        "failed",
        {"build": "success", "approve": "failed", "deploy": "skipped"},
    )


async def test_queue_timeout_starts_when_a_script_job_becomes_pending(
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    clock: ManualClock,
    app: Starlette,
) -> None:
    """A created script job's queue timeout does not run; it counts from when its needs are
    met."""
    body = await create_pipeline(
        client, {"gate": EXTERNAL, "build": {**SCRIPT, "needs": ["gate"], "queue_timeout_s": 60}}
    )
    clock.advance(3600)
    await sweep(app)
    assert (await finish(anon, by_name(body)["gate"])).status_code == 200
    build = (await client.get(f"/api/v1/jobs/{by_name(body)['build']['id']}")).json()
    assert build["state"] == "pending"
    assert build["deadline_at"] == rfc3339(clock.now() + 60)
    clock.advance(61)
    assert await sweep(app) == 1
    build = (await client.get(f"/api/v1/jobs/{build['id']}")).json()
    assert (build["state"], build["failure_reason"]) == ("failed", "queue_timeout")
    assert (await states(client, body["id"]))[0] == "failed"


async def test_continue_on_get_does_not_complete_a_created_job(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, runner: str
) -> None:
    """A `continue_on_get` external job behind a need only shows its state on GET; once its
    needs are met, GET completes it."""
    body = await create_pipeline(
        client,
        {"build": SCRIPT, "notify": {**EXTERNAL, "needs": ["build"], "continue_on_get": True}},
    )
    path = continue_path(by_name(body)["notify"])
    early = await anon.get(path)
    assert early.status_code == 200
    assert early.json()["state"] == "created"
    await run_script(client, runner, "build")
    assert (await anon.get(path)).json()["state"] == "success"
    assert (await states(client, body["id"]))[0] == "success"


# --- needs gate script jobs and skip downstream -----------------------------------------


async def test_job_is_pending_only_once_every_need_succeeded(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, runner: str
) -> None:
    """A job with two needs stays created (and is never handed out) until both succeeded."""
    body = await create_pipeline(
        client,
        {
            "compile": SCRIPT,
            "approve": EXTERNAL,
            "ship": {**SCRIPT, "needs": ["compile", "approve"]},
        },
    )
    await run_script(client, runner, "compile")
    assert (await states(client, body["id"]))[1]["ship"] == "created"
    assert await request_job(client, runner) is None  # `ship` is not handed out

    assert (await finish(anon, by_name(body)["approve"])).status_code == 200
    assert (await states(client, body["id"]))[1]["ship"] == "pending"
    await run_script(client, runner, "ship")
    assert await states(client, body["id"]) == (
        "success",
        {"compile": "success", "approve": "success", "ship": "success"},
    )


async def test_running_need_keeps_downstream_created(
    client: httpx.AsyncClient, runner: str
) -> None:
    """A need that is handed out, running, or async and waiting does not release the job."""
    body = await create_pipeline(
        client,
        {
            "provision": {**SCRIPT, "async": True},
            "deploy": {**SCRIPT, "needs": ["provision"]},
        },
    )
    handout = await request_job(client, runner)
    assert handout is not None
    assert (await states(client, body["id"]))[1]["deploy"] == "created"
    assert (await runner_put(client, handout, state="running")).status_code == 200
    assert (await states(client, body["id"]))[1]["deploy"] == "created"
    assert await exit_script(client, handout) == "waiting"
    assert await states(client, body["id"]) == (
        "waiting",
        {"provision": "waiting", "deploy": "created"},
    )


@pytest.mark.parametrize("how", ["script-failed", "callback-failed", "canceled"])
async def test_failed_or_canceled_need_skips_downstream_transitively(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, runner: str, how: str
) -> None:
    """A failed or canceled need skips its downstream jobs, transitively; unrelated jobs run
    on, and the pipeline ends failed (canceled for a cancel) once they ended."""
    root = EXTERNAL if how == "callback-failed" else SCRIPT
    body = await create_pipeline(
        client,
        {
            "root": root,
            "child": {**EXTERNAL, "needs": ["root"]},
            "grandchild": {**SCRIPT, "needs": ["child"]},
            "sibling": {**SCRIPT, "needs": ["root", "other"]},
            "other": EXTERNAL,
        },
    )
    jobs = by_name(body)
    if how == "script-failed":
        await run_script(client, runner, "root", exit_code=3)
    elif how == "callback-failed":
        assert (await finish(anon, jobs["root"], status="failed")).status_code == 200
    else:
        assert (await client.post(f"/api/v1/jobs/{jobs['root']['id']}/cancel")).status_code == 200
    root_state = "canceled" if how == "canceled" else "failed"
    state, job_states = await states(client, body["id"])
    assert job_states == {
        "root": root_state,
        "child": "skipped",
        "grandchild": "skipped",
        "sibling": "skipped",
        "other": "pending",
    }
    assert state == "waiting"  # only the external `other` is left
    skipped = (await client.get(f"/api/v1/jobs/{jobs['grandchild']['id']}")).json()
    assert skipped["finished_at"] is not None
    assert skipped["deadline_at"] is None
    # a skipped external job's URL is dead
    response = await finish(anon, jobs["child"])
    assert response.status_code == 409
    assert response.json()["error"] == "already_final"
    assert response.json()["state"] == "skipped"

    assert (await finish(anon, jobs["other"])).status_code == 200
    assert (await states(client, body["id"]))[0] == root_state


# --- derived pipeline state through whole runs ------------------------------------------


async def test_state_through_a_whole_run(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, runner: str
) -> None:
    """pending -> running -> waiting (only a parked async job and jobs behind it) -> running
    -> success, with started_at and finished_at set along the way."""
    body = await create_pipeline(
        client,
        {
            "build": SCRIPT,
            "provision": {**SCRIPT, "async": True, "needs": ["build"]},
            "deploy": {**SCRIPT, "needs": ["provision"]},
            "smoke": {**SCRIPT, "needs": ["deploy"]},
        },
    )
    pid = body["id"]
    assert body["state"] == "pending"
    assert body["started_at"] is None

    build = await request_job(client, runner)
    assert build is not None
    assert (await states(client, pid))[0] == "pending"  # handed out, not confirmed yet
    assert (await runner_put(client, build, state="running")).status_code == 200
    assert (await states(client, pid))[0] == "running"
    assert (await get_pipeline(client, pid))["started_at"] is not None
    await exit_script(client, build)
    assert await states(client, pid) == (
        "running",
        {"build": "success", "provision": "pending", "deploy": "created", "smoke": "created"},
    )

    provision = await start_script(client, runner, "provision")
    assert (await states(client, pid))[0] == "running"
    assert await exit_script(client, provision) == "waiting"
    assert await states(client, pid) == (
        "waiting",
        {"build": "success", "provision": "waiting", "deploy": "created", "smoke": "created"},
    )
    assert (await get_pipeline(client, pid))["finished_at"] is None

    url = variables_of(provision)["CI_JOB_CONTINUE_URL"]
    response = await anon.post(url.removeprefix(BASE_URL), json={})
    assert response.status_code == 200, response.text
    assert await states(client, pid) == (
        "running",
        {"build": "success", "provision": "success", "deploy": "pending", "smoke": "created"},
    )
    await run_script(client, runner, "deploy")
    await run_script(client, runner, "smoke")
    final = await get_pipeline(client, pid)
    assert final["state"] == "success"
    assert final["finished_at"] is not None
    assert {job["state"] for job in final["jobs"]} == {"success"}


@pytest.mark.parametrize("exit_code", [0, 1])
async def test_early_callback_in_a_pipeline_applies_on_exit(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, runner: str, exit_code: int
) -> None:
    """An early terminal call on a running async job is applied when the script exits 0,
    releasing the downstream job with its outputs; a script failure wins and skips it."""
    body = await create_pipeline(
        client,
        {"provision": {**SCRIPT, "async": True}, "deploy": {**SCRIPT, "needs": ["provision"]}},
    )
    provision = await start_script(client, runner, "provision")
    url = variables_of(provision)["CI_JOB_CONTINUE_URL"].removeprefix(BASE_URL)
    early = await anon.post(url, json={"outputs": {"HOST": "10.0.0.7"}})
    assert early.status_code == 202, early.text
    assert await states(client, body["id"]) == (
        "running",
        {"provision": "running", "deploy": "created"},
    )
    await exit_script(client, provision, exit_code=exit_code)
    if exit_code:
        assert await states(client, body["id"]) == (
            "failed",
            {"provision": "failed", "deploy": "skipped"},
        )
        return
    assert await states(client, body["id"]) == (
        "running",
        {"provision": "success", "deploy": "pending"},
    )
    deploy = await start_script(client, runner, "deploy")
    assert variables_of(deploy)["HOST"] == "10.0.0.7"


async def test_parked_external_beside_a_running_script_is_running(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, runner: str
) -> None:
    """A parked external job does not make the pipeline waiting while a script job is
    unfinished; once only it is left, the pipeline is waiting."""
    body = await create_pipeline(client, {"approve": EXTERNAL, "build": SCRIPT})
    assert body["state"] == "pending"  # the script job has not started
    build = await start_script(client, runner, "build")
    assert (await states(client, body["id"]))[0] == "running"
    await exit_script(client, build)
    assert (await states(client, body["id"]))[0] == "waiting"
    assert (await finish(anon, by_name(body)["approve"])).status_code == 200
    assert (await states(client, body["id"]))[0] == "success"


async def test_external_only_pipeline_is_waiting_from_creation(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A pipeline whose jobs are parked or behind parked ones is waiting at once, and stays
    waiting when the external job reports it started (a running external job is parked)."""
    body = await create_pipeline(
        client, {"approve": EXTERNAL, "deploy": {**SCRIPT, "needs": ["approve"]}}
    )
    assert body["state"] == "waiting"
    started = await anon.post(f"{continue_path(by_name(body)['approve'])}/start")
    assert started.status_code == 200, started.text
    assert await states(client, body["id"]) == (
        "waiting",
        {"approve": "running", "deploy": "created"},
    )


async def test_failed_script_fails_the_pipeline(client: httpx.AsyncClient, runner: str) -> None:
    """A script failure with nothing else left ends the pipeline failed; its job keeps
    script_failure and the exit code."""
    body = await create_pipeline(client, {"build": SCRIPT, "test": {**SCRIPT, "needs": ["build"]}})
    build = await start_script(client, runner, "build")
    assert await exit_script(client, build, exit_code=2) == "failed"
    final = await get_pipeline(client, body["id"])
    assert final["state"] == "failed"
    assert final["finished_at"] is not None
    jobs = by_name(final)
    assert (jobs["build"]["failure_reason"], jobs["build"]["exit_code"]) == ("script_failure", 2)
    assert jobs["test"]["state"] == "skipped"


async def test_failure_waits_for_unrelated_jobs_before_failing(
    client: httpx.AsyncClient, runner: str
) -> None:
    """One failed job does not end the pipeline while an unrelated job still runs."""
    body = await create_pipeline(client, {"a": SCRIPT, "b": SCRIPT})
    a = await start_script(client, runner, "a")
    b = await start_script(client, runner, "b")
    await exit_script(client, a, exit_code=1)
    assert (await states(client, body["id"]))[0] == "running"
    await exit_script(client, b)
    assert (await states(client, body["id"]))[0] == "failed"


# --- cancel ------------------------------------------------------------------------------


async def test_cancel_cancels_unfinished_jobs(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, runner: str
) -> None:
    """Cancel ends every unfinished job (running, pending, created, parked) as canceled,
    keeps finished ones, answers the canceled pipeline, and the runner learns it from
    Job-Status."""
    body = await create_pipeline(
        client,
        {
            "done": SCRIPT,
            "running": SCRIPT,
            "queued": {**SCRIPT, "needs": ["done"]},
            "approve": EXTERNAL,
            "later": {**SCRIPT, "needs": ["approve"]},
        },
    )
    await run_script(client, runner, "done")
    running = await start_script(client, runner, "running")
    response = await client.post(f"/api/v1/pipelines/{body['id']}/cancel")
    assert response.status_code == 200, response.text
    canceled = response.json()
    assert canceled["state"] == "canceled"
    assert canceled["finished_at"] is not None
    assert {job["name"]: job["state"] for job in canceled["jobs"]} == {
        "done": "success",
        "running": "canceled",
        "queued": "canceled",
        "approve": "canceled",
        "later": "canceled",
    }
    assert await states(client, body["id"]) == (
        "canceled",
        {name: job["state"] for name, job in by_name(canceled).items()},
    )
    ping = await runner_put(client, running, state="running")
    assert ping.status_code == 409
    assert ping.headers["Job-Status"] == "canceled"
    assert await request_job(client, runner) is None
    late = await finish(anon, by_name(body)["approve"])
    assert late.status_code == 409
    assert late.json()["state"] == "canceled"


@pytest.mark.parametrize("end", ["success", "failed", "canceled"])
async def test_cancel_of_a_finished_pipeline_is_409(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, end: str
) -> None:
    """A pipeline that ended (success, failed, or canceled already) cannot be canceled: 409,
    and nothing changes."""
    body = await create_pipeline(client, {"gate": EXTERNAL})
    if end == "canceled":
        assert (await client.post(f"/api/v1/pipelines/{body['id']}/cancel")).status_code == 200
    else:
        assert (await finish(anon, body["jobs"][0], status=end)).status_code == 200
    response = await client.post(f"/api/v1/pipelines/{body['id']}/cancel")
    assert response.status_code == 409, response.text
    assert response.json()["error"] == "already_final"
    assert response.json()["state"] == end
    assert await states(client, body["id"]) == (end, {"gate": end})


# --- attempts, retry ---------------------------------------------------------------------


async def test_retry_reopens_skipped_downstream(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, runner: str
) -> None:
    """Retrying a failed job gives it a new attempt and reopens the downstream jobs it had
    skipped (new attempts, created, external ones with a new continue URL); the pipeline goes
    back to waiting/running and ends success; unrelated and old attempts are untouched."""
    body = await create_pipeline(
        client,
        {
            "provision": EXTERNAL,
            "configure": {**SCRIPT, "needs": ["provision"]},
            "verify": {**EXTERNAL, "needs": ["configure"]},
            "lint": SCRIPT,
        },
    )
    pid = body["id"]
    first = by_name(body)
    await run_script(client, runner, "lint")
    assert (await finish(anon, first["provision"], status="failed")).status_code == 200
    assert await states(client, pid) == (
        "failed",
        {"provision": "failed", "configure": "skipped", "verify": "skipped", "lint": "success"},
    )

    response = await client.post(f"/api/v1/jobs/{first['provision']['id']}/retry")
    assert response.status_code == 201, response.text
    retried = response.json()
    assert (retried["name"], retried["attempt"], retried["retry_of"]) == (
        "provision",
        2,
        first["provision"]["id"],
    )
    assert retried["state"] == "pending"
    assert retried["continue_url"] != first["provision"]["continue_url"]
    reopened = {job["name"]: job for job in retried["reopened"]}
    assert list(reopened) == ["configure", "verify"]
    for name in ("configure", "verify"):
        assert reopened[name]["attempt"] == 2
        assert reopened[name]["retry_of"] == first[name]["id"]
        assert reopened[name]["state"] == "created"
    assert "continue_url" in reopened["verify"]
    assert "continue_url" not in reopened["configure"]
    assert reopened["verify"]["continue_url"] != first["verify"]["continue_url"]

    shown = await get_pipeline(client, pid)
    assert shown["state"] == "waiting"  # the new external attempt is parked, the rest behind it
    assert {job["name"]: (job["attempt"], job["state"]) for job in shown["jobs"]} == {
        "provision": (2, "pending"),
        "configure": (2, "created"),
        "verify": (2, "created"),
        "lint": (1, "success"),
    }
    # the old attempts stay readable, and their URLs stay dead
    old = (await client.get(f"/api/v1/jobs/{first['verify']['id']}")).json()
    assert (old["state"], old["attempt"]) == ("skipped", 1)
    assert (await finish(anon, first["verify"])).status_code == 409
    assert (await finish(anon, reopened["verify"])).json()["error"] == "not_ready"

    assert (await finish(anon, retried)).status_code == 200
    assert (await states(client, pid))[0] == "running"
    await run_script(client, runner, "configure")
    assert (await states(client, pid))[0] == "waiting"
    assert (await finish(anon, reopened["verify"])).status_code == 200
    final = await get_pipeline(client, pid)
    assert final["state"] == "success"
    assert {job["state"] for job in final["jobs"]} == {"success"}


async def test_retry_of_a_script_job_hands_it_out_again(
    client: httpx.AsyncClient, runner: str
) -> None:
    """A retried failed script job is pending again, handed out as attempt 2, and its success
    releases the downstream it had skipped."""
    body = await create_pipeline(client, {"build": SCRIPT, "test": {**SCRIPT, "needs": ["build"]}})
    first = await run_script(client, runner, "build", exit_code=1)
    assert (await states(client, body["id"]))[0] == "failed"
    response = await client.post(f"/api/v1/jobs/{first['id']}/retry")
    assert response.status_code == 201, response.text
    assert [job["name"] for job in response.json()["reopened"]] == ["test"]
    assert (await states(client, body["id"]))[0] == "pending"  # nothing of this round started
    second = await start_script(client, runner, "build")
    assert second["attempt"] == 2
    assert second["id"] == response.json()["id"]
    assert (await states(client, body["id"]))[0] == "running"
    await exit_script(client, second)
    await run_script(client, runner, "test")
    assert (await states(client, body["id"]))[0] == "success"


async def test_retry_keeps_jobs_skipped_for_another_failure(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A reopened job that still has another failed need is skipped again at once."""
    body = await create_pipeline(
        client,
        {"a": EXTERNAL, "b": EXTERNAL, "both": {**EXTERNAL, "needs": ["a", "b"]}},
    )
    jobs = by_name(body)
    await finish(anon, jobs["a"], status="failed")
    await finish(anon, jobs["b"], status="failed")
    response = await client.post(f"/api/v1/jobs/{jobs['a']['id']}/retry")
    assert response.status_code == 201
    assert await states(client, body["id"]) == (
        "waiting",
        {"a": "pending", "b": "failed", "both": "skipped"},
    )
    assert (await finish(anon, response.json())).status_code == 200
    assert (await states(client, body["id"]))[0] == "failed"


async def test_retry_rules_in_a_pipeline(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Only a finished latest attempt can be retried: an unfinished job or an old attempt is
    409."""
    body = await create_pipeline(client, {"gate": EXTERNAL, "after": {**SCRIPT, "needs": ["gate"]}})
    gate = by_name(body)["gate"]
    assert (await client.post(f"/api/v1/jobs/{gate['id']}/retry")).status_code == 409
    await finish(anon, gate, status="failed")
    assert (await client.post(f"/api/v1/jobs/{gate['id']}/retry")).status_code == 201
    again = await client.post(f"/api/v1/jobs/{gate['id']}/retry")
    assert again.status_code == 409
    assert again.json()["error"] == "not_latest_attempt"


async def test_retry_after_cancel_reopens_the_pipeline(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Retrying a job of a canceled pipeline brings the pipeline back from canceled."""
    body = await create_pipeline(client, {"gate": EXTERNAL})
    assert (await client.post(f"/api/v1/pipelines/{body['id']}/cancel")).status_code == 200
    response = await client.post(f"/api/v1/jobs/{body['jobs'][0]['id']}/retry")
    assert response.status_code == 201, response.text
    assert (await states(client, body["id"]))[0] == "waiting"
    assert (await finish(anon, response.json())).status_code == 200
    assert (await states(client, body["id"]))[0] == "success"


async def test_pipeline_shows_the_latest_attempt_and_jobs_list_shows_all(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """GET pipeline shows only each job's latest attempt; GET /api/v1/jobs?pipeline_id= lists
    every attempt of this pipeline's jobs (newest first) and nothing else."""
    body = await create_pipeline(client, {"gate": EXTERNAL, "other": EXTERNAL})
    elsewhere = await create_pipeline(client, {"gate": EXTERNAL})
    standalone = await client.post("/api/v1/jobs", json={"name": "solo"})
    assert standalone.status_code == 201
    gate = by_name(body)["gate"]
    await finish(anon, gate, status="failed")
    second = (await client.post(f"/api/v1/jobs/{gate['id']}/retry")).json()
    await finish(anon, second, status="failed")
    third = (await client.post(f"/api/v1/jobs/{second['id']}/retry")).json()

    shown = by_name(await get_pipeline(client, body["id"]))
    assert (shown["gate"]["id"], shown["gate"]["attempt"]) == (third["id"], 3)
    assert len(shown) == 2

    listed = await client.get("/api/v1/jobs", params={"pipeline_id": body["id"]})
    assert listed.status_code == 200
    ids = [job["id"] for job in listed.json()["items"]]
    assert sorted(ids, reverse=True) == ids
    assert set(ids) == {gate["id"], second["id"], third["id"], by_name(body)["other"]["id"]}
    assert all(job["pipeline_id"] == body["id"] for job in listed.json()["items"])

    page = await client.get("/api/v1/jobs", params={"pipeline_id": body["id"], "limit": 3})
    assert len(page.json()["items"]) == 3
    rest = await client.get(
        "/api/v1/jobs",
        params={"pipeline_id": body["id"], "cursor": page.json()["next_cursor"]},
    )
    assert [job["id"] for job in rest.json()["items"]] == ids[3:]
    failed = await client.get("/api/v1/jobs", params={"pipeline_id": body["id"], "state": "failed"})
    assert {job["id"] for job in failed.json()["items"]} == {gate["id"], second["id"]}
    other = await client.get("/api/v1/jobs", params={"pipeline_id": elsewhere["id"]})
    assert [job["id"] for job in other.json()["items"]] == [elsewhere["jobs"][0]["id"]]


# --- listing -----------------------------------------------------------------------------


async def test_list_pipelines_newest_first_with_filter_and_cursor(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, clock: ManualClock
) -> None:
    """Pipelines are listed newest first, filtered by state, paged by an opaque cursor; a bad
    state or cursor is 400."""
    created = []
    for i in range(5):
        created.append(await create_pipeline(client, {"gate": EXTERNAL}, name=f"p{i}"))
        clock.advance(1)
    for pipeline in created[1::2]:
        assert (await finish(anon, pipeline["jobs"][0])).status_code == 200
    newest_first = [p["id"] for p in reversed(created)]

    listed = (await client.get("/api/v1/pipelines")).json()
    assert [p["id"] for p in listed["items"]] == newest_first
    assert listed["next_cursor"] is None
    assert "jobs" not in listed["items"][0]
    assert [p["name"] for p in listed["items"]] == ["p4", "p3", "p2", "p1", "p0"]

    first = (await client.get("/api/v1/pipelines", params={"limit": 2})).json()
    assert [p["id"] for p in first["items"]] == newest_first[:2]
    second = (
        await client.get("/api/v1/pipelines", params={"limit": 2, "cursor": first["next_cursor"]})
    ).json()
    assert [p["id"] for p in second["items"]] == newest_first[2:4]
    third = (
        await client.get("/api/v1/pipelines", params={"limit": 2, "cursor": second["next_cursor"]})
    ).json()
    assert [p["id"] for p in third["items"]] == newest_first[4:]
    assert third["next_cursor"] is None

    succeeded = (await client.get("/api/v1/pipelines", params={"state": "success"})).json()
    assert [p["id"] for p in succeeded["items"]] == [created[3]["id"], created[1]["id"]]
    waiting = (await client.get("/api/v1/pipelines", params={"state": "waiting"})).json()
    assert [p["id"] for p in waiting["items"]] == [
        created[4]["id"],
        created[2]["id"],
        created[0]["id"],
    ]
    one = (await client.get("/api/v1/pipelines", params={"state": "waiting", "limit": 1})).json()
    rest = (
        await client.get(
            "/api/v1/pipelines", params={"state": "waiting", "cursor": one["next_cursor"]}
        )
    ).json()
    assert [p["id"] for p in one["items"] + rest["items"]] == [p["id"] for p in waiting["items"]]

    for params in ({"state": "done"}, {"cursor": "not-a-cursor"}, {"limit": "0"}, {"limit": "501"}):
        response = await client.get("/api/v1/pipelines", params=params)
        assert response.status_code == 400, (params, response.text)
        assert response.json()["error"] == "malformed"


# --- outputs become variables -------------------------------------------------------------


async def test_outputs_of_needs_become_variables_with_documented_precedence(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, runner: str
) -> None:
    """The hand-out's variables: pipeline < job < outputs of the needs in `needs` order (not
    in the order they finished) < predefined; masked variables stay masked."""
    body = await create_pipeline(
        client,
        {
            "first": EXTERNAL,
            "second": EXTERNAL,
            "unrelated": EXTERNAL,
            "deploy": {
                **SCRIPT,
                "needs": ["first", "second"],
                "variables": {"JOB": "job", "SHARED": "job", "FROM_NEEDS": "job"},
            },
        },
        variables={
            "PIPE": "pipe",
            "JOB": "pipe",
            "SHARED": "pipe",
            "SECRET": {"value": "hunter2", "masked": True},
        },
    )
    assert body["variables"]["SECRET"] == "[MASKED]"
    jobs = by_name(body)
    outputs = {
        "second": {"FROM_NEEDS": "second", "SHARED": "second", "ONLY_SECOND": "2"},
        "first": {
            "FROM_NEEDS": "first",
            "SHARED": "first",
            "ONLY_FIRST": "1",
            "CI_JOB_NAME": "spoofed",
            "CI_JOB_ID": "spoofed",
        },
        "unrelated": {"UNRELATED": "x"},
    }
    for name in ("second", "first", "unrelated"):  # second finishes before first
        response = await finish(anon, jobs[name], outputs=outputs[name])
        assert response.status_code == 200, response.text
    handout = await start_script(client, runner, "deploy")
    variables = variables_of(handout)
    assert variables == {
        "PIPE": "pipe",
        "JOB": "job",
        "SHARED": "second",
        "FROM_NEEDS": "second",
        "SECRET": "hunter2",
        "ONLY_FIRST": "1",
        "ONLY_SECOND": "2",
        "CI_JOB_ID": jobs["deploy"]["id"],
        "CI_JOB_NAME": "deploy",
        "CI_PIPELINE_ID": body["id"],
    }
    masked = {v["key"] for v in handout["variables"] if v["masked"]}
    assert masked == {"SECRET"}
    stored = (await client.get(f"/api/v1/jobs/{jobs['first']['id']}")).json()
    assert stored["outputs"] == outputs["first"]


async def test_outputs_of_the_latest_attempt_are_used(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, runner: str
) -> None:
    """After a retry, the job that needs it sees the outputs of the attempt that succeeded;
    an async job needing it gets its continue URL masked."""
    body = await create_pipeline(
        client,
        {"lookup": EXTERNAL, "use": {**SCRIPT, "async": True, "needs": ["lookup"]}},
    )
    lookup = by_name(body)["lookup"]
    await finish(anon, lookup, status="failed", outputs={"HOST": "old"})
    retried = (await client.post(f"/api/v1/jobs/{lookup['id']}/retry")).json()
    await finish(anon, retried, outputs={"HOST": "new"})
    handout = await start_script(client, runner, "use")
    variables = {v["key"]: v for v in handout["variables"]}
    assert variables["HOST"]["value"] == "new"
    assert variables["CI_JOB_CONTINUE_URL"]["masked"] is True
    assert variables["CI_JOB_CONTINUE_URL"]["value"].startswith(f"{BASE_URL}/continue/")
