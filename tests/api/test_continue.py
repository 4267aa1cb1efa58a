"""The continue URL, rule by rule (PRODUCT.md "Continue URL"), on the real app over ASGI."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
from collections.abc import Coroutine
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from ulid import ULID

from gateway.clock import ManualClock, rfc3339
from gateway.tokens import ContinueTokens
from tests.conftest import BASE_URL, SECRET_KEY, continue_path, create_job, sweep

MIB = 1024 * 1024
TERMINAL = {"success", "failed", "canceled", "skipped"}


async def fetch_job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


async def fetch_events(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/v1/jobs/{job_id}/events", params={"limit": 500})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def fetch_trace(client: httpx.AsyncClient, job_id: str) -> str:
    response = await client.get(f"/api/v1/jobs/{job_id}/trace")
    assert response.status_code == 200, response.text
    return response.text


def terminal_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if event["state"] in TERMINAL]


def token_of(job: dict[str, Any]) -> str:
    return continue_path(job).removeprefix("/continue/")


def assert_already_final(response: httpx.Response, state: str, reason: str | None) -> None:
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["error"] == "already_final"
    assert body["state"] == state
    assert body["failure_reason"] == reason


# --- the terminal call ---------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"{}"], ids=["empty", "empty-object"])
async def test_empty_body_or_empty_object_succeeds(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, content: bytes
) -> None:
    """An empty body and `{}` both finish the job with success and answer {job_id, state}."""
    job = await create_job(client)
    response = await anon.post(continue_path(job), content=content)
    assert response.status_code == 200, response.text
    assert response.json() == {"job_id": job["id"], "state": "success"}
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "success"
    assert stored["failure_reason"] is None
    assert stored["exit_code"] is None
    assert stored["deadline_at"] is None
    assert stored["finished_at"] is not None


async def test_every_field_is_stored_and_visible_on_the_job(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """status, exit_code, message, outputs and result are kept and shown by GET /api/v1/jobs."""
    job = await create_job(client)
    result = {"build": {"sha": "abc", "layers": [1, 2, 3]}, "ok": True, "ratio": 0.5}
    body = {
        "status": "success",
        "exit_code": 0,
        "message": "deployed to prod",
        "outputs": {"IMAGE": "registry/app:1.2", "REGION": "eu-west-1"},
        "result": result,
    }
    response = await anon.post(continue_path(job), json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"job_id": job["id"], "state": "success"}
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "success"
    assert stored["exit_code"] == 0
    assert stored["message"] == "deployed to prod"
    assert stored["outputs"] == {"IMAGE": "registry/app:1.2", "REGION": "eu-west-1"}
    assert stored["result"] == result
    assert "continue_url" not in stored
    assert token_of(job) not in json.dumps(stored)


async def test_non_zero_exit_code_without_status_fails_with_callback_failure(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A non-zero exit_code with no status means failed, failure_reason callback_failure."""
    job = await create_job(client)
    response = await anon.post(continue_path(job), json={"exit_code": 3, "message": "boom"})
    assert response.status_code == 200, response.text
    assert response.json() == {"job_id": job["id"], "state": "failed"}
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "failed"
    assert stored["failure_reason"] == "callback_failure"
    assert stored["exit_code"] == 3
    assert stored["message"] == "boom"


async def test_zero_exit_code_without_status_succeeds(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """exit_code 0 with no status means success."""
    job = await create_job(client)
    response = await anon.post(continue_path(job), json={"exit_code": 0})
    assert response.json() == {"job_id": job["id"], "state": "success"}
    assert (await fetch_job(client, job["id"]))["exit_code"] == 0


async def test_status_failed_fails_with_callback_failure(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """`status: failed` fails the job with callback_failure, even without an exit_code."""
    job = await create_job(client)
    response = await anon.post(continue_path(job), json={"status": "failed", "message": "denied"})
    assert response.status_code == 200, response.text
    assert response.json() == {"job_id": job["id"], "state": "failed"}
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "failed"
    assert stored["failure_reason"] == "callback_failure"
    assert stored["message"] == "denied"


async def test_success_with_non_zero_exit_code_is_422_and_not_consumed(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """`status: success` with a non-zero exit_code is refused with 422; the token still works."""
    job = await create_job(client)
    response = await anon.post(continue_path(job), json={"status": "success", "exit_code": 1})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid"
    assert (await fetch_job(client, job["id"]))["state"] == "pending"
    again = await anon.post(continue_path(job), json={})
    assert again.json() == {"job_id": job["id"], "state": "success"}


# --- unknown and forged tokens -------------------------------------------------------------


def _forged_tokens(real_token: str, job_id: str) -> dict[str, str]:
    material, signature = real_token.rsplit(".", 1)
    flip = signature[10]
    tampered_signature = signature[:10] + ("A" if flip != "A" else "B") + signature[11:]
    flip = material[0]
    tampered_material = ("A" if flip != "A" else "B") + material[1:]
    return {
        "never-minted": ContinueTokens(SECRET_KEY).mint(str(ULID())).token,
        "random": secrets.token_urlsafe(32),
        "random-dotted": secrets.token_urlsafe(24) + "." + secrets.token_urlsafe(32),
        "tampered-signature": material + "." + tampered_signature,
        "tampered-material": tampered_material + "." + signature,
        "unsigned-material": material,
        "other-key": ContinueTokens("another-secret-key-0123456789abcdef").mint(job_id).token,
        "overlong": real_token + "x" * 300,
        "non-ascii": real_token[:-1] + "\u00e9",
    }


async def test_unknown_and_forged_tokens_get_one_identical_404_on_every_route(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Every unknown or forged token gets a byte-identical 404 on every continue route, and the
    job that the forgeries imitate is not touched."""
    job = await create_job(client, heartbeat_timeout_s=600)
    before = await fetch_job(client, job["id"])
    forged = _forged_tokens(token_of(job), job["id"])
    bodies: set[bytes] = set()
    for name, token in forged.items():
        path = f"/continue/{token}"
        answers = [
            await anon.post(path, json={"status": "failed", "message": "forged"}),
            await anon.post(path),
            await anon.get(path),
            await anon.post(f"{path}/start"),
            await anon.post(f"{path}/heartbeat"),
            await anon.post(f"{path}/log", content=b"forged log line\n"),
        ]
        for response in answers:
            assert response.status_code == 404, (name, response.request.url, response.text)
            bodies.add(response.content)
        head = await anon.head(path)
        assert head.status_code == 404, name
        assert head.content in (b"", answers[0].content)
    assert len(bodies) == 1, bodies
    assert json.loads(bodies.pop())["error"] == "not_found"
    after = await fetch_job(client, job["id"])
    assert after == before
    assert [e["state"] for e in await fetch_events(client, job["id"])] == ["pending"]
    assert await fetch_trace(client, job["id"]) == ""
    # The real token still works afterwards.
    response = await anon.post(continue_path(job), json={})
    assert response.json() == {"job_id": job["id"], "state": "success"}


async def test_forged_token_on_a_finished_job_is_still_the_same_404(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Forgeries of a finished job's token get the same 404 as any other, not a 409."""
    job = await create_job(client)
    await anon.post(continue_path(job), json={})
    unknown = await anon.post(f"/continue/{ContinueTokens(SECRET_KEY).mint(str(ULID())).token}")
    for token in _forged_tokens(token_of(job), job["id"]).values():
        response = await anon.post(f"/continue/{token}", json={})
        assert response.status_code == 404
        assert response.content == unknown.content


# --- check order: token, size, syntax and fields, state ------------------------------------


async def test_unknown_token_with_oversized_body_is_404_not_413(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """The token is checked before the size: an unknown token with a huge body gets the 404."""
    job = await create_job(client)
    unknown = ContinueTokens(SECRET_KEY).mint(str(ULID())).token
    reference = await anon.post(f"/continue/{unknown}", json={})
    huge = b"x" * (MIB + 1)
    for path in (f"/continue/{unknown}", f"/continue/{unknown}/log", "/continue/forged-token"):
        response = await anon.post(path, content=huge)
        assert response.status_code == 404, path
        assert response.content == reference.content
    assert (await fetch_job(client, job["id"]))["state"] == "pending"


async def test_valid_token_with_body_over_limit_is_413_and_not_consumed(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A body over 1 MiB is refused with 413; the job is unchanged and the token still works."""
    job = await create_job(client)
    before = await fetch_job(client, job["id"])
    oversized = json.dumps({"message": "x" * MIB}).encode()
    response = await anon.post(continue_path(job), content=oversized)
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "too_large"
    log = await anon.post(continue_path(job) + "/log", content=b"y" * (MIB + 1))
    assert log.status_code == 413
    assert await fetch_job(client, job["id"]) == before
    assert await fetch_trace(client, job["id"]) == ""
    ok = await anon.post(continue_path(job), json={"message": "fits"})
    assert ok.json() == {"job_id": job["id"], "state": "success"}


async def test_streamed_body_over_limit_without_content_length_is_413(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A chunked body with no Content-Length is cut off at the limit too (413, not consumed)."""
    job = await create_job(client)

    async def chunks() -> Any:
        for _ in range(17):
            yield b" " * (64 * 1024)
        yield b"{}"

    response = await anon.post(continue_path(job), content=chunks())
    assert response.status_code == 413, response.text
    assert (await fetch_job(client, job["id"]))["state"] == "pending"
    ok = await anon.post(continue_path(job), json={})
    assert ok.json()["state"] == "success"


async def test_body_exactly_at_the_limit_is_accepted(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """The limit is inclusive: a body of exactly 1 MiB is read and applied."""
    job = await create_job(client)
    filler = MIB - len(json.dumps({"message": ""}).encode())
    body = json.dumps({"message": "m" * filler}).encode()
    assert len(body) == MIB
    response = await anon.post(continue_path(job), content=body)
    assert response.status_code == 200, response.text
    assert len((await fetch_job(client, job["id"]))["message"]) == filler


async def test_size_is_checked_before_state_on_a_finished_job(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """On a finished job, an oversized body still gets 413 (size before state)."""
    job = await create_job(client)
    await anon.post(continue_path(job), json={})
    response = await anon.post(continue_path(job), content=b"x" * (MIB + 1))
    assert response.status_code == 413


@pytest.mark.parametrize(
    "content",
    [b"{", b"not json", b'{"message": "a"} trailing', b"{'status': 'failed'}", b"\xff\xfe"],
    ids=["truncated", "words", "trailing", "single-quotes", "binary"],
)
async def test_malformed_json_is_400_and_not_consumed(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, content: bytes
) -> None:
    """Bad JSON syntax gets 400 `malformed`; nothing changes and the token still works."""
    job = await create_job(client)
    response = await anon.post(continue_path(job), content=content)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "malformed"
    assert (await fetch_job(client, job["id"]))["state"] == "pending"
    ok = await anon.post(continue_path(job), json={})
    assert ok.json() == {"job_id": job["id"], "state": "success"}


@pytest.mark.parametrize(
    "body",
    [
        {"status": "done"},
        {"status": 1},
        {"exit_code": "1"},
        {"exit_code": 1.5},
        {"exit_code": True},
        {"exit_code": 2**40},
        {"message": 5},
        {"outputs": {"A": 1}},
        {"outputs": {"A": None}},
        {"outputs": {"A": ["x"]}},
        {"outputs": ["A"]},
        {"outputs": {"1BAD": "x"}},
        {"outputs": {"A-B": "x"}},
        {"bogus": 1},
        {"status": "success", "extra": True},
        [],
        [{}],
        "success",
        5,
        None,
    ],
    ids=lambda body: json.dumps(body),
)
async def test_invalid_fields_are_422_and_not_consumed(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, body: Any
) -> None:
    """Wrong types, non-string outputs, unknown fields and non-objects get 422 `invalid`;
    nothing changes and the token still works."""
    job = await create_job(client)
    response = await anon.post(continue_path(job), content=json.dumps(body).encode())
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid"
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "pending"
    assert stored["message"] is None
    ok = await anon.post(continue_path(job), json={"status": "failed"})
    assert ok.json() == {"job_id": job["id"], "state": "failed"}


async def test_invalid_body_on_a_finished_job_is_still_422(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Fields are checked before the state: an invalid body on a finished job gets 422."""
    job = await create_job(client)
    await anon.post(continue_path(job), json={})
    assert (await anon.post(continue_path(job), json={"bogus": 1})).status_code == 422
    assert (await anon.post(continue_path(job), content=b"{")).status_code == 400


async def test_overlong_idempotency_key_is_422_and_not_consumed(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """An Idempotency-Key over 255 characters is refused with 422; the token still works."""
    job = await create_job(client)
    response = await anon.post(continue_path(job), json={}, headers={"Idempotency-Key": "k" * 256})
    assert response.status_code == 422
    ok = await anon.post(continue_path(job), json={}, headers={"Idempotency-Key": "k" * 255})
    assert ok.status_code == 200


# --- terminal jobs: 409 already_final, or the replay of an exact repeat ------------------


async def test_token_of_a_succeeded_job_gets_409_already_final(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """After success, a different call gets 409 already_final with the state; nothing changes."""
    job = await create_job(client)
    await anon.post(continue_path(job), json={"message": "first"})
    response = await anon.post(continue_path(job), json={"status": "failed", "message": "late"})
    assert_already_final(response, "success", None)
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "success"
    assert stored["message"] == "first"
    assert len(terminal_events(await fetch_events(client, job["id"]))) == 1


async def test_token_of_a_timed_out_job_gets_409_with_callback_timeout(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """A job failed by callback_timeout answers 409 already_final naming the reason."""
    job = await create_job(client, callback_timeout_s=60)
    clock.advance(61)
    assert await sweep(app) == 1
    response = await anon.post(continue_path(job), json={})
    assert_already_final(response, "failed", "callback_timeout")
    assert (await fetch_job(client, job["id"]))["state"] == "failed"


async def test_token_of_a_canceled_job_gets_409(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A canceled job's URL answers 409 already_final (state canceled)."""
    job = await create_job(client)
    canceled = await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200
    response = await anon.post(continue_path(job), json={})
    assert_already_final(response, "canceled", None)
    assert (await fetch_job(client, job["id"]))["state"] == "canceled"


async def test_retry_supersedes_the_old_url_and_the_new_one_works(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """After a retry the old attempt's URL gets 409; the new attempt's URL finishes it."""
    job = await create_job(client)
    failed = await anon.post(continue_path(job), json={"status": "failed"})
    assert failed.json()["state"] == "failed"
    retried = await client.post(f"/api/v1/jobs/{job['id']}/retry")
    assert retried.status_code == 201, retried.text
    new = retried.json()
    assert new["id"] != job["id"]
    assert new["attempt"] == 2
    assert new["retry_of"] == job["id"]
    assert new["continue_url"] != job["continue_url"]
    old = await anon.post(continue_path(job), json={"message": "for the old attempt"})
    assert_already_final(old, "failed", "callback_failure")
    response = await anon.post(continue_path(new), json={})
    assert response.json() == {"job_id": new["id"], "state": "success"}
    assert (await fetch_job(client, job["id"]))["state"] == "failed"
    assert (await fetch_job(client, new["id"]))["state"] == "success"
    # The old token never reaches the new attempt, even on its non-terminal routes.
    assert_already_final(
        await anon.post(continue_path(job) + "/start"), "failed", "callback_failure"
    )


async def test_exact_repeat_gets_the_first_response_again(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A JSON-equal repeat (any key order or spacing) gets the first 200 again; nothing changes."""
    job = await create_job(client)
    body = {"message": "done", "outputs": {"A": "1", "B": "2"}, "result": {"x": 1, "y": [1, 2]}}
    first = await anon.post(continue_path(job), json=body)
    assert first.status_code == 200
    same = await anon.post(continue_path(job), json=body)
    reordered = await anon.post(
        continue_path(job),
        content=b'{ "result": {"y": [1, 2], "x": 1},\n "outputs": {"B": "2", "A": "1"},'
        b' "message": "done" }',
    )
    for repeat in (same, reordered):
        assert repeat.status_code == 200, repeat.text
        assert repeat.content == first.content
    different = await anon.post(continue_path(job), json={**body, "message": "other"})
    assert_already_final(different, "success", None)
    assert len(terminal_events(await fetch_events(client, job["id"]))) == 1


async def test_repeat_of_a_failing_call_gets_the_first_response_again(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """The replay works for a failing call too: 200 with state failed, not a 409."""
    job = await create_job(client)
    first = await anon.post(continue_path(job), json={"exit_code": 2})
    again = await anon.post(continue_path(job), json={"exit_code": 2})
    assert again.status_code == 200
    assert again.content == first.content
    assert again.json()["state"] == "failed"


@pytest.mark.parametrize(("first", "repeat"), [(b"", b"{}"), (b"{}", b""), (b"", b"")])
async def test_empty_body_counts_as_empty_object_for_a_repeat(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, first: bytes, repeat: bytes
) -> None:
    """An empty body and `{}` are the same call: either repeats the other."""
    job = await create_job(client)
    one = await anon.post(continue_path(job), content=first)
    assert one.status_code == 200
    two = await anon.post(continue_path(job), content=repeat)
    assert two.status_code == 200, two.text
    assert two.content == one.content


async def test_same_idempotency_key_gets_the_first_response_whatever_the_body(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """The same Idempotency-Key with another body gets the first response; without the key, or
    with another key, a different body gets 409; the first call's fields stay."""
    job = await create_job(client)
    key = {"Idempotency-Key": "delivery-42"}
    first = await anon.post(continue_path(job), json={"message": "first"}, headers=key)
    assert first.status_code == 200
    replay = await anon.post(continue_path(job), json={"status": "failed"}, headers=key)
    assert replay.status_code == 200
    assert replay.content == first.content
    no_key = await anon.post(continue_path(job), json={"status": "failed"})
    assert_already_final(no_key, "success", None)
    other_key = await anon.post(
        continue_path(job), json={"status": "failed"}, headers={"Idempotency-Key": "delivery-43"}
    )
    assert_already_final(other_key, "success", None)
    equal_body = await anon.post(
        continue_path(job), json={"message": "first"}, headers={"Idempotency-Key": "other"}
    )
    assert equal_body.content == first.content
    stored = await fetch_job(client, job["id"])
    assert (stored["state"], stored["message"]) == ("success", "first")


async def test_different_body_without_key_gets_409(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A call that differs from the one that finished the job gets 409, even `{}` vs a status."""
    job = await create_job(client)
    await anon.post(continue_path(job), json={"exit_code": 0})
    assert_already_final(await anon.post(continue_path(job), json={}), "success", None)
    assert_already_final(
        await anon.post(continue_path(job), json={"exit_code": 0, "message": "x"}), "success", None
    )


# --- GET and HEAD ---------------------------------------------------------------------------


async def test_get_shows_the_job_and_does_not_complete_it(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """GET answers {job_id, state, deadline_at} for a valid token and leaves the job pending."""
    job = await create_job(client, callback_timeout_s=3600)
    for _ in range(3):
        response = await anon.get(continue_path(job))
        assert response.status_code == 200, response.text
        assert response.json() == {
            "job_id": job["id"],
            "state": "pending",
            "deadline_at": job["deadline_at"],
        }
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "pending"
    assert [e["state"] for e in await fetch_events(client, job["id"])] == ["pending"]
    # The token was not consumed by the GETs: the terminal call still applies.
    done = await anon.post(continue_path(job), json={"status": "failed"})
    assert done.json()["state"] == "failed"
    after = await anon.get(continue_path(job))
    assert after.status_code == 200
    assert after.json() == {"job_id": job["id"], "state": "failed", "deadline_at": None}


async def test_head_does_not_complete(client: httpx.AsyncClient, anon: httpx.AsyncClient) -> None:
    """HEAD on a valid token answers 200 and leaves the job pending."""
    job = await create_job(client)
    response = await anon.head(continue_path(job))
    assert response.status_code == 200
    assert (await fetch_job(client, job["id"]))["state"] == "pending"


async def test_continue_on_get_completes_on_get_but_not_on_head(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A job created with continue_on_get completes on GET (once); HEAD still never completes."""
    job = await create_job(client, continue_on_get=True)
    head = await anon.head(continue_path(job))
    assert head.status_code == 200
    assert (await fetch_job(client, job["id"]))["state"] == "pending"
    response = await anon.get(continue_path(job))
    assert response.status_code == 200, response.text
    assert response.json() == {"job_id": job["id"], "state": "success", "deadline_at": None}
    assert (await fetch_job(client, job["id"]))["state"] == "success"
    again = await anon.get(continue_path(job))
    assert again.json()["state"] == "success"
    assert len(terminal_events(await fetch_events(client, job["id"]))) == 1


async def test_continue_on_get_job_still_accepts_post(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """continue_on_get adds GET; a POST with a failure still works, and a later GET does not
    change the result."""
    job = await create_job(client, continue_on_get=True)
    done = await anon.post(continue_path(job), json={"status": "failed"})
    assert done.json()["state"] == "failed"
    shown = await anon.get(continue_path(job))
    assert shown.status_code == 200
    assert shown.json()["state"] == "failed"
    assert (await fetch_job(client, job["id"]))["failure_reason"] == "callback_failure"


# --- start, heartbeat, log ------------------------------------------------------------------


async def test_start_moves_an_external_job_to_running_once(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, clock: ManualClock
) -> None:
    """/start: pending -> running; a second start is a no-op 200; one running transition."""
    job = await create_job(client)
    first = await anon.post(continue_path(job) + "/start")
    assert first.status_code == 200, first.text
    assert first.json()["job_id"] == job["id"]
    assert first.json()["state"] == "running"
    started_at = (await fetch_job(client, job["id"]))["started_at"]
    assert started_at == rfc3339(clock.now())
    clock.advance(5)
    second = await anon.post(continue_path(job) + "/start")
    assert second.status_code == 200
    assert second.json()["state"] == "running"
    stored = await fetch_job(client, job["id"])
    assert stored["state"] == "running"
    assert stored["started_at"] == started_at
    events = await fetch_events(client, job["id"])
    assert [(e["previous_state"], e["state"]) for e in events] == [
        (None, "pending"),
        ("pending", "running"),
    ]
    done = await anon.post(continue_path(job), json={})
    assert done.json() == {"job_id": job["id"], "state": "success"}


async def test_heartbeat_pushes_the_heartbeat_deadline(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, app: Starlette, clock: ManualClock
) -> None:
    """/heartbeat moves deadline_at; past the original deadline but before the pushed one the
    job lives; past the pushed one it fails with heartbeat_timeout."""
    job = await create_job(client, heartbeat_timeout_s=60, callback_timeout_s=3600)
    created = clock.now()
    assert job["deadline_at"] == rfc3339(created + 60)
    clock.advance(40)
    beat = await anon.post(continue_path(job) + "/heartbeat")
    assert beat.status_code == 200, beat.text
    assert beat.json() == {
        "job_id": job["id"],
        "state": "pending",
        "deadline_at": rfc3339(created + 100),
    }
    assert (await fetch_job(client, job["id"]))["deadline_at"] == rfc3339(created + 100)
    clock.advance(30)  # 70 s: past the original deadline, before the pushed one
    assert await sweep(app) == 0
    assert (await fetch_job(client, job["id"]))["state"] == "pending"
    clock.advance(31)  # 101 s
    assert await sweep(app) == 1
    stored = await fetch_job(client, job["id"])
    assert (stored["state"], stored["failure_reason"]) == ("failed", "heartbeat_timeout")
    assert len([e for e in await fetch_events(client, job["id"]) if e["state"] == "pending"]) == 1


@pytest.mark.parametrize("route", ["start", "log"])
async def test_start_and_log_also_reset_the_heartbeat_deadline(
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    app: Starlette,
    clock: ManualClock,
    route: str,
) -> None:
    """/start and /log count as signs of life: they push the heartbeat deadline too."""
    job = await create_job(client, heartbeat_timeout_s=60, callback_timeout_s=3600)
    created = clock.now()
    clock.advance(50)
    response = await anon.post(continue_path(job) + f"/{route}", content=b"still going\n")
    assert response.status_code == 200, response.text
    assert response.json()["deadline_at"] == rfc3339(created + 110)
    clock.advance(50)  # 100 s: past the original 60 s
    assert await sweep(app) == 0
    assert (await fetch_job(client, job["id"]))["state"] in ("pending", "running")


async def test_heartbeat_without_heartbeat_timeout_keeps_the_callback_deadline(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, clock: ManualClock
) -> None:
    """With no heartbeat_timeout_s a heartbeat is accepted and leaves deadline_at alone."""
    job = await create_job(client, callback_timeout_s=300)
    clock.advance(100)
    beat = await anon.post(continue_path(job) + "/heartbeat")
    assert beat.status_code == 200
    assert beat.json()["deadline_at"] == job["deadline_at"]


async def test_log_appends_to_the_trace_and_masks_the_continue_token(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """/log appends text to the trace; the continue token never shows in the trace."""
    job = await create_job(client)
    token = token_of(job)
    first = await anon.post(continue_path(job) + "/log", content=b"provisioning node 1\n")
    assert first.status_code == 200, first.text
    second = await anon.post(
        continue_path(job) + "/log",
        content=f"call {job['continue_url']} when done; token={token}\n".encode(),
    )
    assert second.status_code == 200
    third = await anon.post(continue_path(job) + "/log", content=b"done\n")
    assert third.status_code == 200
    trace = await fetch_trace(client, job["id"])
    assert trace.startswith("provisioning node 1\ncall ")
    assert trace.endswith("done\n")
    assert token not in trace
    assert trace.count("[MASKED]") == 2
    assert f"{BASE_URL}/continue/[MASKED] when done" in trace
    assert (await fetch_job(client, job["id"]))["state"] == "pending"
    # The token is still masked once the job is finished.
    await anon.post(continue_path(job), json={})
    assert token not in await fetch_trace(client, job["id"])


@pytest.mark.parametrize("route", ["start", "heartbeat", "log"])
async def test_non_terminal_calls_on_a_finished_job_get_409(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, route: str
) -> None:
    """start, heartbeat and log on a terminal job answer 409 already_final; the trace is kept."""
    job = await create_job(client)
    await anon.post(continue_path(job) + "/log", content=b"before\n")
    await anon.post(continue_path(job), json={"exit_code": 7})
    response = await anon.post(continue_path(job) + f"/{route}", content=b"after\n")
    assert_already_final(response, "failed", "callback_failure")
    assert await fetch_trace(client, job["id"]) == "before\n"
    assert len(await fetch_events(client, job["id"])) == 2


async def test_non_terminal_calls_do_not_consume_the_token(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Any number of start, heartbeat and log calls leave the terminal call available."""
    job = await create_job(client, heartbeat_timeout_s=600)
    for route in ("start", "heartbeat", "log", "heartbeat", "start", "log"):
        response = await anon.post(continue_path(job) + f"/{route}", content=b"tick\n")
        assert response.status_code == 200, (route, response.text)
    done = await anon.post(continue_path(job), json={"message": "finished"})
    assert done.json() == {"job_id": job["id"], "state": "success"}
    assert await fetch_trace(client, job["id"]) == "tick\ntick\n"


# --- races ------------------------------------------------------------------------------------


def _racing_bodies(count: int) -> list[dict[str, Any]]:
    """Ten distinct calls, each sent count/10 times; the message names the call."""
    bodies: list[dict[str, Any]] = []
    for i in range(count):
        k = i % 10
        body: dict[str, Any] = {"message": f"caller-{k}"}
        if k % 3 == 1:
            body["status"] = "failed"
        elif k % 3 == 2:
            body["exit_code"] = k
        bodies.append(body)
    return bodies


@pytest.mark.parametrize("round_", range(3))
async def test_concurrent_terminal_calls_apply_exactly_once(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, round_: int
) -> None:
    """40 concurrent terminal calls with mixed bodies: one applies; those with the winner's body
    get its response again, every other gets 409 already_final; never a 500."""
    job = await create_job(client)
    bodies = _racing_bodies(40)
    random.Random(round_).shuffle(bodies)
    responses = await asyncio.gather(*(anon.post(continue_path(job), json=body) for body in bodies))
    stored = await fetch_job(client, job["id"])
    assert stored["state"] in ("success", "failed")
    events = await fetch_events(client, job["id"])
    assert len(terminal_events(events)) == 1
    assert events[-1]["state"] == stored["state"]
    winner = next(body for body in bodies if body["message"] == stored["message"])
    expected = {"job_id": job["id"], "state": stored["state"]}
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code in (200, 409), response.text
        if body == winner:
            assert response.status_code == 200
            assert response.json() == expected
        else:
            assert_already_final(response, stored["state"], stored["failure_reason"])


@pytest.mark.parametrize("round_", range(8))
async def test_callback_sweeper_and_cancel_race_to_one_outcome(
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    app: Starlette,
    clock: ManualClock,
    round_: int,
) -> None:
    """A callback, a second callback, the sweeper and a cancel racing on an overdue job: exactly
    one terminal transition, and every answer agrees with the final state."""
    job = await create_job(client, callback_timeout_s=10)
    clock.advance(11)
    callbacks = [{"message": "ok"}, {"status": "failed", "message": "no"}]
    contenders: dict[str, Coroutine[Any, Any, Any]] = {
        "first": anon.post(continue_path(job), json=callbacks[0]),
        "second": anon.post(continue_path(job), json=callbacks[1]),
        "sweep": sweep(app),
        "cancel": client.post(f"/api/v1/jobs/{job['id']}/cancel"),
    }
    names = list(contenders)
    leader = names[round_ % len(names)]

    async def run(name: str) -> Any:
        # Each round gives another contender a head start of two database round trips (all of
        # them still overlap), so that each of them gets to win in some round.
        if name != leader:
            for _ in range(2):
                await anon.get("/readyz")
        return await contenders[name]

    first, second, swept, canceled = await asyncio.gather(*(run(name) for name in names))
    stored = await fetch_job(client, job["id"])
    state, reason = stored["state"], stored["failure_reason"]
    events = await fetch_events(client, job["id"])
    assert len(terminal_events(events)) == 1
    assert stored["deadline_at"] is None
    for response in (first, second, canceled):
        assert response.status_code in (200, 409), response.text
    by_callback = [
        (body, response)
        for body, response in zip(callbacks, (first, second), strict=True)
        if response.status_code == 200
    ]
    assert swept == (1 if reason == "callback_timeout" else 0)
    assert canceled.status_code == (200 if state == "canceled" else 409)
    if state == "canceled":
        assert canceled.json()["state"] == "canceled"
    else:
        assert_already_final(canceled, state, reason)
    if state == "canceled" or reason == "callback_timeout":
        assert not by_callback
        assert stored["message"] is None
    else:
        assert (state, reason) in (("success", None), ("failed", "callback_failure"))
        assert len(by_callback) == 1
        body, response = by_callback[0]
        assert response.json() == {"job_id": job["id"], "state": state}
        assert stored["message"] == body["message"]
    for response in (first, second):
        if response.status_code == 409:
            assert_already_final(response, state, reason)
