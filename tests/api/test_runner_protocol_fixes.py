"""Regressions found while writing docs/runner-protocol.md: the server masks a pipeline's masked
variables in a trace, and a failure reason a runner may not report is a 422, not a 409."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import BASE_URL

PIPELINE_SECRET = "pipeline-secret-0123456789"
JOB_SECRET = "job-secret-9876543210"


async def register_runner(client: httpx.AsyncClient) -> dict[str, str]:
    response = await client.post("/api/v1/runners", json={"description": "fixes"})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


async def take_job(anon: httpx.AsyncClient, runner: dict[str, str]) -> dict[str, Any]:
    """Request a job and confirm it; returns the hand-out."""
    response = await anon.post("/api/v1/runner/jobs/request", headers=runner, json={"wait_s": 0})
    assert response.status_code == 201, response.text
    handout: dict[str, Any] = response.json()
    confirmed = await anon.put(
        f"/api/v1/runner/jobs/{handout['id']}",
        headers={"Job-Token": handout["token"]},
        json={"state": "running"},
    )
    assert confirmed.status_code == 200, confirmed.text
    return handout


async def test_trace_read_masks_the_pipelines_masked_variables(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A trace sent unmasked is read back with the pipeline's and the job's masked values and
    the continue URL's token hidden."""
    runner = await register_runner(client)
    created = await client.post(
        "/api/v1/pipelines",
        json={
            "name": "masking",
            "variables": {"PIPELINE_SECRET": {"value": PIPELINE_SECRET, "masked": True}},
            "jobs": {
                "deploy": {
                    "script": ["true"],
                    "async": True,
                    "variables": {"JOB_SECRET": {"value": JOB_SECRET, "masked": True}},
                }
            },
        },
    )
    assert created.status_code == 201, created.text
    handout = await take_job(anon, runner)
    values = {v["key"]: v for v in handout["variables"]}
    assert values["PIPELINE_SECRET"]["masked"] is True
    url = values["CI_JOB_CONTINUE_URL"]["value"]
    line = f"{PIPELINE_SECRET} {JOB_SECRET} {url}\n".encode()
    appended = await anon.patch(
        f"/api/v1/runner/jobs/{handout['id']}/trace",
        headers={"Job-Token": handout["token"], "Content-Range": f"0-{len(line) - 1}"},
        content=line,
    )
    assert appended.status_code == 202, appended.text
    trace = await client.get(f"/api/v1/jobs/{handout['id']}/trace")
    assert trace.status_code == 200
    assert PIPELINE_SECRET not in trace.text
    assert JOB_SECRET not in trace.text
    assert url.removeprefix(f"{BASE_URL}/continue/") not in trace.text
    assert trace.text == f"[MASKED] [MASKED] {BASE_URL}/continue/[MASKED]\n"


async def test_exit_with_a_reason_a_runner_may_not_report_is_422_and_changes_nothing(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """`failed` with `callback_timeout` is refused as an invalid field; the job stays running."""
    runner = await register_runner(client)
    created = await client.post(
        "/api/v1/jobs", json={"name": "build", "kind": "script", "script": ["true"]}
    )
    assert created.status_code == 201, created.text
    handout = await take_job(anon, runner)
    response = await anon.put(
        f"/api/v1/runner/jobs/{handout['id']}",
        headers={"Job-Token": handout["token"]},
        json={"state": "failed", "exit_code": 1, "failure_reason": "callback_timeout"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid"
    job = await client.get(f"/api/v1/jobs/{handout['id']}")
    assert job.json()["state"] == "running"
