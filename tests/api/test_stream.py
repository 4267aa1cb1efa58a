"""`GET /api/v1/events/stream`: every job and pipeline event as Server-Sent Events, with global
increasing ids, filters, and resumption from `Last-Event-ID`.

Over the ASGI transport a stream never ends by itself, so these tests close the app's event
wake-up first (what a shutdown does): the stream then serves its backlog and ends. The live
case is in tests/integration/test_stream_live.py."""

from __future__ import annotations

import json
from typing import Any

import httpx
from starlette.applications import Starlette

from tests.conftest import continue_path, create_job


def parse(text: str) -> list[dict[str, Any]]:
    """SSE frames as {"id", "event", "data"} (comments and the retry line skipped)."""
    frames = []
    for block in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":")
        )
        if "data" in fields:
            frames.append(
                {
                    "id": int(fields["id"]),
                    "event": fields["event"],
                    "data": json.loads(fields["data"]),
                }
            )
    return frames


async def backlog(client: httpx.AsyncClient, app: Starlette, **params: Any) -> httpx.Response:
    app.state.ctx.events.close()
    return await client.get("/api/v1/events/stream", params=params)


async def test_the_stream_replays_events_after_the_given_id_in_order(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette
) -> None:
    """From `last_event_id=0` every event comes, ids strictly increasing, each `data` the
    webhook body of the event (type, timestamp, the job with previous_state and sequence)."""
    job = await create_job(client)
    assert (
        await anon.post(continue_path(job), json={"outputs": {"IP": "10.0.0.1"}})
    ).status_code == 200
    response = await backlog(client, app, last_event_id=0)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = parse(response.text)
    assert [f["event"] for f in frames] == ["job.pending", "job.success"]
    assert frames[0]["id"] < frames[1]["id"]
    pending, success = (f["data"] for f in frames)
    assert pending["type"] == "job.pending"
    assert pending["data"]["state"] == "pending"
    assert pending["data"]["previous_state"] is None
    assert pending["data"]["sequence"] == 1
    assert success["data"]["state"] == "success"
    assert success["data"]["previous_state"] == "pending"
    assert success["data"]["outputs"] == {"IP": "10.0.0.1"}


async def test_resuming_skips_what_the_client_has_seen(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette
) -> None:
    """`Last-Event-ID` (header) resumes after that event."""
    job = await create_job(client)
    await anon.post(continue_path(job), json={})
    app.state.ctx.events.close()
    everything = parse((await client.get("/api/v1/events/stream?last_event_id=0")).text)
    first = everything[0]["id"]
    rest = await client.get("/api/v1/events/stream", headers={"Last-Event-ID": str(first)})
    assert [f["id"] for f in parse(rest.text)] == [f["id"] for f in everything[1:]]


async def test_without_a_cursor_the_stream_starts_from_now(
    client: httpx.AsyncClient, app: Starlette
) -> None:
    """No cursor: nothing from before the request."""
    await create_job(client)
    assert parse((await backlog(client, app)).text) == []


async def test_a_cursor_the_server_never_handed_out_is_400(
    client: httpx.AsyncClient, app: Starlette
) -> None:
    """Unknown (past the newest event), negative or non-numeric cursors are refused."""
    await create_job(client)
    for bad in ("999999", "-1", "abc", "1e3", "٣"):
        response = await client.get("/api/v1/events/stream", params={"last_event_id": bad})
        assert response.status_code == 400, bad
        assert response.json()["error"] == "malformed"


async def test_the_stream_needs_a_token(anon: httpx.AsyncClient) -> None:
    """401 without credentials, in the JSON error shape."""
    response = await anon.get("/api/v1/events/stream")
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


async def test_job_filter_follows_later_attempts_and_pipeline_filter_keeps_its_own(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette
) -> None:
    """`job_id` streams the job and its retries; `pipeline_id` the pipeline's and its jobs'
    events only."""
    job = await create_job(client, callback_timeout_s=60)
    other = await create_job(client, name="other")
    await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    retried = (await client.post(f"/api/v1/jobs/{job['id']}/retry")).json()
    await anon.post(retried["continue_url"].removeprefix("http://gateway.test"), json={})
    pipeline = (
        await client.post(
            "/api/v1/pipelines",
            json={"name": "p", "jobs": {"ext": {"kind": "external"}}},
        )
    ).json()
    app.state.ctx.events.close()
    by_job = parse(
        (
            await client.get(
                "/api/v1/events/stream", params={"last_event_id": 0, "job_id": job["id"]}
            )
        ).text
    )
    owners = {f["data"]["data"]["id"] for f in by_job}
    assert owners == {job["id"], retried["id"]}
    assert other["id"] not in owners
    by_pipeline = parse(
        (
            await client.get(
                "/api/v1/events/stream", params={"last_event_id": 0, "pipeline_id": pipeline["id"]}
            )
        ).text
    )
    assert {f["event"].split(".")[0] for f in by_pipeline} == {"job", "pipeline"}
    assert all(
        f["data"]["data"].get("pipeline_id", f["data"]["data"]["id"]) == pipeline["id"]
        for f in by_pipeline
    )
