"""`/api/v1/jobs` on the real app: create, read, list, cancel, retry, trace and events."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.clock import ManualClock, rfc3339
from gateway.config import DEFAULT_CALLBACK_TIMEOUT_S, Settings
from gateway.store.base import encode_cursor
from tests.conftest import BASE_URL, api_client, continue_path, create_job

WEBHOOK_SECRET = "whsec_c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cy0wMTIzNDU2Nzg5YWI="


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is the contract's JSON error shape with `status` (and `code`, when given)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert isinstance(body.get("error"), str) and body["error"]
    assert isinstance(body.get("detail"), str) and body["detail"]
    if code is not None:
        assert body["error"] == code, body
    return body


def token_of(job: dict[str, Any]) -> str:
    return continue_path(job).removeprefix("/continue/")


async def list_all(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/jobs", params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


# --- create --------------------------------------------------------------------------------


async def test_create_external_job_answers_201_with_its_continue_url(
    client: httpx.AsyncClient,
) -> None:
    """Creating an external job answers 201 with the job, pending, and a continue URL."""
    response = await client.post("/api/v1/jobs", json={"name": "deploy"})
    assert response.status_code == 201
    job = response.json()
    assert job["name"] == "deploy"
    assert job["kind"] == "external"
    assert job["state"] == "pending"
    assert job["continue_url"].startswith(f"{BASE_URL}/continue/")
    assert len(token_of(job)) >= 22  # >= 128 bits, whatever the encoding


async def test_get_and_list_never_show_a_token_or_secret(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """GET and list never return the continue URL, its token or the state webhook secret."""
    job = await create_job(
        client,
        state_webhook_url="https://hooks.example.com/gateway",
        state_webhook_secret=WEBHOOK_SECRET,
    )
    token = token_of(job)
    assert WEBHOOK_SECRET not in json.dumps(job)
    answers = [
        await client.get(f"/api/v1/jobs/{job['id']}"),
        await client.get("/api/v1/jobs"),
        await client.get(f"/api/v1/jobs/{job['id']}/events"),
    ]
    await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    answers.append(await client.get(f"/api/v1/jobs/{job['id']}"))
    for response in answers:
        assert response.status_code == 200
        assert token not in response.text
        assert "continue_url" not in response.text
        assert WEBHOOK_SECRET not in response.text
        assert "state_webhook_secret" not in response.text
    shown = answers[0].json()
    assert shown["id"] == job["id"]
    assert "token" not in shown


async def test_create_script_job_has_no_continue_url(client: httpx.AsyncClient) -> None:
    """A script job is created pending, with its script, and no continue URL (it gets one at
    hand-out)."""
    response = await client.post(
        "/api/v1/jobs", json={"name": "build", "kind": "script", "script": ["make", "make test"]}
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["kind"] == "script"
    assert job["state"] == "pending"
    assert job["async"] is False
    assert "continue_url" not in job


@pytest.mark.parametrize(
    "body",
    [
        {"name": "build", "kind": "script"},
        {"name": "build", "kind": "script", "script": []},
        {"name": "build", "kind": "script", "script": "make"},
    ],
    ids=["missing", "empty", "not-a-list"],
)
async def test_script_job_needs_a_script_list(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    """A script job without a non-empty list of script lines is refused with 422."""
    assert_error(await client.post("/api/v1/jobs", json=body), 422, "invalid")
    assert await list_all(client) == []


async def test_defaults_external_attempt_one_and_default_callback_deadline(
    client: httpx.AsyncClient, clock: ManualClock
) -> None:
    """Only `name` given: an external job, attempt 1, no retry_of, and a deadline set by the
    default callback timeout."""
    job = await create_job(client, name="approve")
    assert job["kind"] == "external"
    assert job["async"] is False
    assert job["attempt"] == 1
    assert job["retry_of"] is None
    assert job["pipeline_id"] is None
    assert job["failure_reason"] is None
    assert job["created_at"] == rfc3339(clock.now())
    assert job["deadline_at"] == rfc3339(clock.now() + DEFAULT_CALLBACK_TIMEOUT_S)
    stored = (await client.get(f"/api/v1/jobs/{job['id']}")).json()
    assert stored["deadline_at"] == job["deadline_at"]


async def test_default_callback_timeout_comes_from_settings(
    settings: Settings, clock: ManualClock, tmp_path: Path
) -> None:
    """GATEWAY_DEFAULT_CALLBACK_TIMEOUT_S sets the deadline of a job that names no timeout; an
    explicit `callback_timeout_s` wins."""
    custom = dataclasses.replace(
        settings, data_dir=tmp_path / "custom", default_callback_timeout_s=600
    )
    application = create_app(custom, clock=clock, run_sweeper=False)
    async with application.router.lifespan_context(application), api_client(application) as http:
        defaulted = await create_job(http)
        explicit = await create_job(http, callback_timeout_s=60)
    assert defaulted["deadline_at"] == rfc3339(clock.now() + 600)
    assert explicit["deadline_at"] == rfc3339(clock.now() + 60)


async def test_unknown_field_is_refused_naming_it(client: httpx.AsyncClient) -> None:
    """An unknown field in the body -> 422 naming the field; no job is created."""
    response = await client.post("/api/v1/jobs", json={"name": "deploy", "colour": "red"})
    body = assert_error(response, 422, "invalid")
    assert "colour" in body["detail"]
    assert await list_all(client) == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": 5}, "name"),
        ({"name": "deploy", "kind": "lambda"}, "kind"),
        ({"name": "deploy", "timeout_s": "ten"}, "timeout_s"),
        ({"name": "deploy", "callback_timeout_s": 0}, "callback_timeout_s"),
        ({"name": "deploy", "heartbeat_timeout_s": 1.5}, "heartbeat_timeout_s"),
        ({"name": "deploy", "variables": {"REGION": 1}}, "variables"),
        ({"name": "deploy", "variables": ["REGION"]}, "variables"),
        ({"name": "deploy", "tags": "linux"}, "tags"),
        ({"name": "deploy", "continue_on_get": "yes"}, "continue_on_get"),
        ({"name": "deploy", "state_webhook_url": 42}, "state_webhook_url"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
async def test_wrong_types_are_refused_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    """A field of the wrong type or out of range -> 422 whose detail names the field."""
    response = await client.post("/api/v1/jobs", json=body)
    detail = assert_error(response, 422, "invalid")["detail"]
    assert field in detail


async def test_missing_name_is_refused(client: httpx.AsyncClient) -> None:
    """A body without `name` -> 422 naming it."""
    body = assert_error(await client.post("/api/v1/jobs", json={"kind": "external"}), 422)
    assert "name" in body["detail"]


@pytest.mark.parametrize("raw", [b'{"name": ', b"{'name': 'deploy'}", b"\xff\xfe", b"nul"])
async def test_malformed_json_is_400(client: httpx.AsyncClient, raw: bytes) -> None:
    """A body that is not JSON -> 400 malformed."""
    response = await client.post(
        "/api/v1/jobs", content=raw, headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "malformed")


async def test_empty_body_is_refused_with_the_error_shape(client: httpx.AsyncClient) -> None:
    """An empty body -> 400 or 422 with the JSON error shape, never a job."""
    response = await client.post("/api/v1/jobs", content=b"")
    assert response.status_code in (400, 422)
    assert_error(response, response.status_code)
    assert await list_all(client) == []


# --- read and list -------------------------------------------------------------------------


@pytest.mark.parametrize("job_id", ["01ARZ3NDEKTSV4RRFFQ69G5FAV", "nope"])
async def test_get_unknown_job_is_404(client: httpx.AsyncClient, job_id: str) -> None:
    """An unknown job id -> 404 not_found on every job route."""
    assert_error(await client.get(f"/api/v1/jobs/{job_id}"), 404, "not_found")
    assert_error(await client.post(f"/api/v1/jobs/{job_id}/cancel"), 404, "not_found")
    assert_error(await client.post(f"/api/v1/jobs/{job_id}/retry"), 404, "not_found")
    assert_error(await client.get(f"/api/v1/jobs/{job_id}/trace"), 404, "not_found")
    assert_error(await client.get(f"/api/v1/jobs/{job_id}/events"), 404, "not_found")


async def test_list_is_newest_first(client: httpx.AsyncClient, clock: ManualClock) -> None:
    """Jobs are listed newest first, each as GET shows it."""
    created = []
    for index in range(3):
        created.append(await create_job(client, name=f"job-{index}"))
        clock.advance(1)
    page = (await client.get("/api/v1/jobs")).json()
    assert [item["id"] for item in page["items"]] == [job["id"] for job in reversed(created)]
    assert page["next_cursor"] is None
    assert page["items"][0] == (await client.get(f"/api/v1/jobs/{created[-1]['id']}")).json()


async def test_list_filters_by_state(client: httpx.AsyncClient) -> None:
    """`?state=` returns only jobs in that state."""
    first = await create_job(client, name="first")
    second = await create_job(client, name="second")
    third = await create_job(client, name="third", kind="script", script=["true"])
    assert (await client.post(f"/api/v1/jobs/{second['id']}/cancel")).status_code == 200
    canceled = await list_all(client, state="canceled")
    assert [job["id"] for job in canceled] == [second["id"]]
    pending = await list_all(client, state="pending")
    assert [job["id"] for job in pending] == [third["id"], first["id"]]
    assert await list_all(client, state="success") == []


async def test_list_filters_by_pipeline_id(client: httpx.AsyncClient) -> None:
    """`?pipeline_id=` returns only that pipeline's jobs: standalone jobs are not in any."""
    await create_job(client)
    assert len(await list_all(client)) == 1
    assert await list_all(client, pipeline_id="01ARZ3NDEKTSV4RRFFQ69G5FAV") == []


async def test_cursor_pagination_walks_every_job_exactly_once(
    client: httpx.AsyncClient, clock: ManualClock
) -> None:
    """With `limit=3`, following `next_cursor` visits 7 jobs exactly once, newest first, and
    ends with a null cursor."""
    created = []
    for index in range(7):
        created.append((await create_job(client, name=f"job-{index}"))["id"])
        clock.advance(0.5)
    seen: list[str] = []
    sizes = []
    params: dict[str, Any] = {"limit": 3}
    for _ in range(10):
        response = await client.get("/api/v1/jobs", params=params)
        assert response.status_code == 200
        page = response.json()
        sizes.append(len(page["items"]))
        seen.extend(item["id"] for item in page["items"])
        if page["next_cursor"] is None:
            break
        params = {"limit": 3, "cursor": page["next_cursor"]}
    assert sizes == [3, 3, 1]
    assert seen == list(reversed(created))


async def test_cursor_pagination_combines_with_a_state_filter(client: httpx.AsyncClient) -> None:
    """A cursor keeps the filter it was walked with: paging pending jobs skips canceled ones."""
    ids = [(await create_job(client, name=f"job-{index}"))["id"] for index in range(5)]
    for job_id in ids[1::2]:
        await client.post(f"/api/v1/jobs/{job_id}/cancel")
    first = (await client.get("/api/v1/jobs", params={"state": "pending", "limit": 2})).json()
    rest = (
        await client.get(
            "/api/v1/jobs",
            params={"state": "pending", "limit": 2, "cursor": first["next_cursor"]},
        )
    ).json()
    walked = [item["id"] for item in first["items"] + rest["items"]]
    assert walked == [ids[4], ids[2], ids[0]]
    assert rest["next_cursor"] is None


@pytest.mark.parametrize(
    "cursor",
    ["not a cursor!", "%%%", "é", encode_cursor("e:5"), encode_cursor("j:" + "0" * 80), ""],
    ids=["junk", "percent", "unicode", "events-cursor", "too-long", "empty"],
)
async def test_bad_cursor_is_400(client: httpx.AsyncClient, cursor: str) -> None:
    """A cursor the server did not hand out -> 400 malformed."""
    await create_job(client)
    response = await client.get("/api/v1/jobs", params={"cursor": cursor})
    assert_error(response, 400, "malformed")


@pytest.mark.parametrize("limit", ["0", "501", "abc", "-1", "1.5", "", "٣", "²", "0x10"])
async def test_bad_limit_is_400(client: httpx.AsyncClient, limit: str) -> None:
    """`limit` outside 1..500 or not an integer -> 400 malformed."""
    response = await client.get("/api/v1/jobs", params={"limit": limit})
    assert_error(response, 400, "malformed")


@pytest.mark.parametrize("limit", ["1", "500"])
async def test_limit_bounds_are_accepted(client: httpx.AsyncClient, limit: str) -> None:
    """`limit` 1 and 500 are both accepted."""
    await create_job(client)
    await create_job(client)
    page = (await client.get("/api/v1/jobs", params={"limit": limit})).json()
    assert len(page["items"]) == min(int(limit), 2)
    assert (page["next_cursor"] is None) == (limit == "500")


@pytest.mark.parametrize("state", ["bogus", "PENDING", ""])
async def test_bad_state_filter_is_400(client: httpx.AsyncClient, state: str) -> None:
    """An unknown `state` filter -> 400 malformed."""
    assert_error(await client.get("/api/v1/jobs", params={"state": state}), 400, "malformed")


# --- cancel --------------------------------------------------------------------------------


async def test_cancel_pending_then_again_is_already_final(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Cancel of a pending job -> 200 canceled; a second cancel -> 409 already_final; its
    continue URL is dead."""
    job = await create_job(client)
    response = await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    canceled = response.json()
    assert canceled["state"] == "canceled"
    assert canceled["finished_at"] is not None
    assert canceled["deadline_at"] is None
    again = assert_error(await client.post(f"/api/v1/jobs/{job['id']}/cancel"), 409)
    assert again["error"] == "already_final"
    assert again["state"] == "canceled"
    assert_error(await anon.post(continue_path(job), json={}), 409, "already_final")
    assert (await client.get(f"/api/v1/jobs/{job['id']}")).json()["state"] == "canceled"


# --- retry ---------------------------------------------------------------------------------


async def test_retry_of_a_non_terminal_job_is_409(client: httpx.AsyncClient) -> None:
    """Only a terminal job can be retried: retrying a pending one -> 409 and creates nothing."""
    job = await create_job(client)
    assert_error(await client.post(f"/api/v1/jobs/{job['id']}/retry"), 409)
    assert [item["id"] for item in await list_all(client)] == [job["id"]]


async def test_retry_creates_a_new_attempt_with_a_new_continue_url(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Retry of a finished job -> 201 with attempt 2, retry_of the old id and a new continue URL
    that works; the old attempt stays readable and its URL stays dead."""
    old = await create_job(client)
    assert (await anon.post(continue_path(old), json={"status": "failed"})).status_code == 200
    response = await client.post(f"/api/v1/jobs/{old['id']}/retry")
    assert response.status_code == 201, response.text
    new = response.json()
    assert new["id"] != old["id"]
    assert new["attempt"] == 2
    assert new["retry_of"] == old["id"]
    assert new["state"] == "pending"
    assert new["name"] == old["name"]
    assert new["continue_url"] != old["continue_url"]
    kept = (await client.get(f"/api/v1/jobs/{old['id']}")).json()
    assert kept["state"] == "failed"
    assert kept["failure_reason"] == "callback_failure"
    assert kept["attempt"] == 1
    assert "continue_url" not in (await client.get(f"/api/v1/jobs/{new['id']}")).json()
    assert_error(await anon.post(continue_path(old), json={}), 409, "already_final")
    finished = await anon.post(continue_path(new), json={})
    assert finished.json() == {"job_id": new["id"], "state": "success"}


async def test_retry_of_a_script_job_has_no_continue_url(client: httpx.AsyncClient) -> None:
    """Retrying a script job gives a new pending attempt without a continue URL."""
    old = await create_job(client, kind="script", script=["true"])
    await client.post(f"/api/v1/jobs/{old['id']}/cancel")
    response = await client.post(f"/api/v1/jobs/{old['id']}/retry")
    assert response.status_code == 201
    new = response.json()
    assert new["kind"] == "script"
    assert new["attempt"] == 2
    assert "continue_url" not in new


async def test_only_the_latest_attempt_can_be_retried(client: httpx.AsyncClient) -> None:
    """Retrying an attempt that was already retried -> 409; the latest one retries to
    attempt 3."""
    first = await create_job(client)
    await client.post(f"/api/v1/jobs/{first['id']}/cancel")
    second = (await client.post(f"/api/v1/jobs/{first['id']}/retry")).json()
    assert_error(await client.post(f"/api/v1/jobs/{first['id']}/retry"), 409)
    await client.post(f"/api/v1/jobs/{second['id']}/cancel")
    assert_error(await client.post(f"/api/v1/jobs/{first['id']}/retry"), 409)
    third = await client.post(f"/api/v1/jobs/{second['id']}/retry")
    assert third.status_code == 201
    assert third.json()["attempt"] == 3
    assert third.json()["retry_of"] == second["id"]
    assert len(await list_all(client)) == 3


async def test_concurrent_retries_create_exactly_one_attempt(client: httpx.AsyncClient) -> None:
    """Two retries of the same job at once: exactly one 201, the other 409; one new attempt."""
    job = await create_job(client)
    await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    responses = await asyncio.gather(
        *(client.post(f"/api/v1/jobs/{job['id']}/retry") for _ in range(2))
    )
    assert sorted(response.status_code for response in responses) == [201, 409]
    for response in responses:
        if response.status_code == 409:
            assert_error(response, 409)
    attempts = await list_all(client)
    assert sorted(item["attempt"] for item in attempts) == [1, 2]


# --- trace and events ----------------------------------------------------------------------


async def test_trace_reads_from_an_offset(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """The trace is the text logged on the continue URL; `?offset=` reads from that byte."""
    job = await create_job(client)
    for chunk in ("hello ", "world\n"):
        logged = await anon.post(f"{continue_path(job)}/log", content=chunk.encode())
        assert logged.status_code == 200, logged.text
    whole = await client.get(f"/api/v1/jobs/{job['id']}/trace")
    assert whole.status_code == 200
    assert whole.headers["content-type"].startswith("text/plain")
    assert whole.text == "hello world\n"
    tail = await client.get(f"/api/v1/jobs/{job['id']}/trace", params={"offset": 6})
    assert tail.text == "world\n"
    past = await client.get(f"/api/v1/jobs/{job['id']}/trace", params={"offset": 1000})
    assert past.status_code == 200
    assert past.text == ""


async def test_empty_trace_is_empty_text(client: httpx.AsyncClient) -> None:
    """A job that logged nothing has an empty trace."""
    job = await create_job(client)
    response = await client.get(f"/api/v1/jobs/{job['id']}/trace")
    assert response.status_code == 200
    assert response.text == ""


@pytest.mark.parametrize("offset", ["abc", "-1", "1.5", "", "²", str(2**63)])
async def test_bad_trace_offset_is_400(client: httpx.AsyncClient, offset: str) -> None:
    """A trace offset that is not a non-negative integer -> 400 malformed."""
    job = await create_job(client)
    response = await client.get(f"/api/v1/jobs/{job['id']}/trace", params={"offset": offset})
    assert_error(response, 400, "malformed")


async def test_events_list_the_transition_history_in_order(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, clock: ManualClock
) -> None:
    """Events: one per transition, with increasing sequence, state, previous state, time and
    cause, oldest first."""
    job = await create_job(client)
    clock.advance(5)
    assert (await anon.post(f"{continue_path(job)}/start")).status_code == 200
    clock.advance(5)
    assert (await anon.post(continue_path(job), json={"status": "failed"})).status_code == 200
    response = await client.get(f"/api/v1/jobs/{job['id']}/events")
    assert response.status_code == 200
    page = response.json()
    assert page["next_cursor"] is None
    items = page["items"]
    assert [(e["previous_state"], e["state"]) for e in items] == [
        (None, "pending"),
        ("pending", "running"),
        ("running", "failed"),
    ]
    sequences = [event["sequence"] for event in items]
    assert sequences == sorted(set(sequences))
    assert [event["at"] for event in items] == [
        rfc3339(clock.now() - 10),
        rfc3339(clock.now() - 5),
        rfc3339(clock.now()),
    ]
    for event in items:
        assert isinstance(event["cause"], str) and event["cause"]
    assert items[-1]["failure_reason"] == "callback_failure"


async def test_events_paginate_with_a_cursor(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Events page with `limit` and `next_cursor` like every list; a bad cursor -> 400."""
    job = await create_job(client)
    await anon.post(f"{continue_path(job)}/start")
    await anon.post(continue_path(job), json={})
    first = (await client.get(f"/api/v1/jobs/{job['id']}/events", params={"limit": 2})).json()
    assert len(first["items"]) == 2
    rest = (
        await client.get(
            f"/api/v1/jobs/{job['id']}/events", params={"limit": 2, "cursor": first["next_cursor"]}
        )
    ).json()
    assert [event["state"] for event in first["items"] + rest["items"]] == [
        "pending",
        "running",
        "success",
    ]
    assert rest["next_cursor"] is None
    bad = await client.get(f"/api/v1/jobs/{job['id']}/events", params={"cursor": "junk!"})
    assert_error(bad, 400, "malformed")
    assert_error(await client.get(f"/api/v1/jobs/{job['id']}/events", params={"limit": "0"}), 400)


async def test_retry_starts_a_fresh_event_history(client: httpx.AsyncClient) -> None:
    """A new attempt's history starts at pending with no previous state."""
    job = await create_job(client)
    await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    new = (await client.post(f"/api/v1/jobs/{job['id']}/retry")).json()
    items = (await client.get(f"/api/v1/jobs/{new['id']}/events")).json()["items"]
    assert [(e["previous_state"], e["state"]) for e in items] == [(None, "pending")]
    old_items = (await client.get(f"/api/v1/jobs/{job['id']}/events")).json()["items"]
    assert [e["state"] for e in old_items] == ["pending", "canceled"]
