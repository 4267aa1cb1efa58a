"""The dashboard's pages over the real app: what each shows (parked jobs and their deadlines,
stages by needs, buttons only where they apply), and the live region the pages' script
re-fetches."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from gateway.clock import ManualClock
from tests.api.test_runner_api import claim_and_confirm, put_state, register_runner, script_job
from tests.api.test_ui_auth import sign_in
from tests.conftest import ADMIN_TOKEN, BASE_URL, continue_path, create_job


@pytest.fixture
async def browser(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A signed-in admin session."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as http:
        assert (await sign_in(http, ADMIN_TOKEN)).status_code == 303
        yield http


def rows(html: str, attribute: str) -> list[str]:
    return re.findall(rf'<tr {attribute}="([^"]+)"', html)


async def test_parked_lists_awaited_jobs_longest_waiting_first_with_their_deadline(
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    browser: httpx.AsyncClient,
    clock: ManualClock,
) -> None:
    """/parked shows external jobs pending or running and async jobs waiting (not a pending
    script job, a job behind its needs, or a finished one), longest waiting first, each with
    which deadline is next and its time in epoch ms for the countdown."""
    first = await create_job(client, name="argo-sync", callback_timeout_s=3600)
    await script_job(client, name="queued-script")
    pipeline = await client.post(
        "/api/v1/pipelines",
        json={
            "name": "p",
            "jobs": {"gate": {"script": ["x"]}, "later": {"kind": "external", "needs": ["gate"]}},
        },
    )
    assert pipeline.status_code == 201
    done = await create_job(client, name="done")
    await anon.post(continue_path(done), json={})
    clock.advance(60)
    async_job = await script_job(client, name="provision", **{"async": True})
    runner = await register_runner(client)
    handout = await claim_and_confirm(anon, runner)
    assert handout.body["name"] == "queued-script"
    await put_state(anon, handout, {"state": "success"})
    handout = await claim_and_confirm(anon, runner)
    assert handout.body["name"] == "gate"
    await put_state(anon, handout, {"state": "success"})  # `later` becomes pending: parked
    handout = await claim_and_confirm(anon, runner)
    assert handout.id == async_job["id"]
    clock.advance(30)
    await put_state(anon, handout, {"state": "success"})
    clock.advance(30)
    last = await create_job(client, name="approval", heartbeat_timeout_s=300)

    page = await browser.get("/parked")
    assert page.status_code == 200
    later = next(j for j in pipeline.json()["jobs"] if j["name"] == "later")
    assert rows(page.text, "data-job-id") == [first["id"], later["id"], async_job["id"], last["id"]]
    deadlines = re.findall(r'class="deadline-name" data-label="Deadline">([^<]+)<', page.text)
    assert deadlines == ["callback timeout"] * 3 + ["heartbeat timeout"]
    approval = (await client.get(f"/api/v1/jobs/{last['id']}")).json()
    assert approval["deadline_at"] is not None
    assert f'data-deadline="{int((clock.now() + 300) * 1000)}"' in page.text


async def test_the_pipeline_page_lays_jobs_out_in_stages_by_the_longest_needs_path(
    client: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """Stage N holds the jobs whose longest needs path has N-1 steps; each card names its
    state, and the pipeline's Cancel button shows while it is unfinished."""
    response = await client.post(
        "/api/v1/pipelines",
        json={
            "name": "release",
            "jobs": {
                "build": {"script": ["b"]},
                "lint": {"script": ["l"]},
                "test": {"script": ["t"], "needs": ["build"]},
                "deploy": {"kind": "external", "needs": ["test", "lint"]},
            },
        },
    )
    pipeline = response.json()
    page = (await browser.get(f"/pipelines/{pipeline['id']}")).text
    sections = re.split(r'<section class="stage" aria-label="Stage \d+">', page)[1:]
    assert [re.findall(r'data-job="([^"]+)"', section) for section in sections] == [
        ["build", "lint"],
        ["test"],
        ["deploy"],
    ]
    assert 'data-job="deploy" data-job-id="' in page
    assert re.search(r'data-job="build"[^>]*data-state="pending"', page)
    assert page.count('<span class="attempt" title="attempt 1">#1</span>') == 4
    assert 'data-kind="cancel-pipeline"' in page
    assert 'data-stream="/api/v1/events/stream?pipeline_id=' in page


async def test_job_buttons_show_only_where_they_apply(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """A pending job offers Cancel, not Retry; a failed one Retry, not Cancel; once retried,
    neither, and the page says it was retried."""
    job = await create_job(client)
    pending = (await browser.get(f"/jobs/{job['id']}")).text
    assert 'data-kind="cancel"' in pending
    assert 'data-kind="retry"' not in pending
    await anon.post(continue_path(job), json={"status": "failed", "message": "boom"})
    failed = (await browser.get(f"/jobs/{job['id']}")).text
    assert 'data-kind="cancel"' not in failed
    assert 'data-kind="retry"' in failed
    assert "callback failure" in failed
    assert (await client.post(f"/api/v1/jobs/{job['id']}/retry")).status_code == 201
    retried = (await browser.get(f"/jobs/{job['id']}")).text
    assert 'data-kind="retry"' not in retried
    assert "was retried" in retried


async def test_the_job_page_shows_timeline_outputs_result_and_deliveries(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """The job page lists each transition, the outputs and result of its callback, and its
    webhook deliveries with a Redeliver button."""
    job = await create_job(client, state_webhook_url="https://hooks.example/ci")
    await anon.post(f"{continue_path(job)}/start")
    await anon.post(
        continue_path(job),
        json={"outputs": {"IMAGE": "app:1.2"}, "result": {"ok": True, "n": 3}},
    )
    page = (await browser.get(f"/jobs/{job['id']}")).text
    assert re.findall(r'<li class="s-\w+" data-state="(\w+)"', page) == [
        "pending",
        "running",
        "success",
    ]
    assert "IMAGE" in page and "app:1.2" in page
    assert "&#34;ok&#34;: true" in page
    assert len(rows(page, "data-delivery-id")) == 3
    assert page.count('data-kind="redeliver"') == 0  # still pending: nothing to redeliver yet
    assert "data-poll" in page


async def test_the_live_region_is_served_alone_for_the_pages_script(
    client: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """With `X-Gateway-Fragment: 1` a page answers only its live region (no layout), carrying
    the current state."""
    job = await create_job(client, name="fragment-job")
    full = await browser.get("/jobs")
    assert "<html" in full.text
    assert 'data-stream="/api/v1/events/stream"' in full.text
    assert 'data-last-event-id="' in full.text
    fragment = await browser.get("/jobs", headers={"X-Gateway-Fragment": "1"})
    assert fragment.status_code == 200
    assert "<html" not in fragment.text
    assert "topbar" not in fragment.text
    assert job["id"] in fragment.text


async def test_lists_filter_by_state_and_unknown_ids_are_404_pages(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """/jobs?state= filters (standalone jobs only); an unknown job or pipeline is an HTML 404;
    an unknown state filter is 400."""
    kept = await create_job(client, name="kept")
    finished = await create_job(client, name="finished")
    await anon.post(continue_path(finished), json={})
    await client.post("/api/v1/pipelines", json={"name": "p", "jobs": {"x": {"kind": "external"}}})
    assert rows((await browser.get("/jobs")).text, "data-job-id") == [finished["id"], kept["id"]]
    only = (await browser.get("/jobs", params={"state": "success"})).text
    assert rows(only, "data-job-id") == [finished["id"]]
    assert (await browser.get("/jobs", params={"state": "nope"})).status_code == 400
    missing = await browser.get("/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("text/html")
    assert (await browser.get("/pipelines/nope")).status_code == 404


async def test_runners_and_webhooks_pages_show_what_they_do(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """/runners names the job a runner runs now; /webhooks lists endpoints, enabled or
    disabled."""
    await script_job(client, name="compile")
    runner = await register_runner(client)
    await claim_and_confirm(anon, runner)
    runners = (await browser.get("/runners")).text
    assert ">compile</a>" in runners
    hook = await client.post("/api/v1/webhooks", json={"url": "https://hooks.example/x"})
    assert hook.status_code == 201
    await client.patch(f"/api/v1/webhooks/{hook.json()['id']}", json={"enabled": False})
    hooks = (await browser.get("/webhooks")).text
    assert "https://hooks.example/x" in hooks
    assert 'data-state="disabled"' in hooks
