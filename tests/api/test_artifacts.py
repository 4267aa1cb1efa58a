"""Artifacts (PRODUCT.md "Webhooks", artifacts): uploads through the continue URL and by the
runner, their limits and checks, downloads, the metadata on the job, and the terminal event's
listing (inlined bytes or an expiring signed URL) as a real receiver on loopback gets it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.clock import ManualClock, rfc3339
from gateway.config import Settings
from gateway.tokens import ContinueTokens
from tests.api.test_runner_api import (
    claim,
    claim_and_confirm,
    put_state,
    register_runner,
    script_job,
)
from tests.conftest import (
    ADMIN_TOKEN,
    BASE_URL,
    SECRET_KEY,
    continue_path,
    create_job,
    read_db,
    sweep,
)

MAX_ARTIFACT = 4096
INLINE_BUDGET = 100
URL_TTL_S = 3 * 86_400


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Small limits, so the edges are cheap to reach; webhooks may reach loopback."""
    return dataclasses.replace(
        settings,
        max_artifact_bytes=MAX_ARTIFACT,
        webhook_inline_bytes=INLINE_BUDGET,
        artifact_url_ttl_s=URL_TTL_S,
        webhook_allow_nets="127.0.0.0/8",
        webhook_retry_schedule="0.05",
    )


def artifact_path(job: dict[str, Any], name: str) -> str:
    return f"{continue_path(job)}/artifacts/{name}"


async def upload(
    anon: httpx.AsyncClient,
    job: dict[str, Any],
    name: str,
    data: bytes,
    content_type: str | None = "text/plain",
) -> httpx.Response:
    headers = {} if content_type is None else {"Content-Type": content_type}
    return await anon.put(artifact_path(job, name), content=data, headers=headers)


def metadata(name: str, data: bytes, content_type: str = "text/plain") -> dict[str, Any]:
    return {
        "name": name,
        "content_type": content_type,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


@pytest.fixture(autouse=True)
async def subscribed(client: httpx.AsyncClient) -> None:
    """An endpoint that wants every event, so every event's webhook body is frozen (an event no
    endpoint wants has none). The dispatcher does not run here: nothing is sent."""
    response = await client.post("/api/v1/webhooks", json={"url": "https://receiver.example/hook"})
    assert response.status_code == 201, response.text


def message_bodies(settings: Settings, job_id: str) -> dict[str, dict[str, Any]]:
    """The frozen webhook bodies of a job's events, by event type, read from the database."""
    rows = read_db(
        settings, "SELECT event_type, body FROM webhook_messages WHERE job_id = ?", job_id
    )
    return {event_type: json.loads(body) for event_type, body in rows}


# --- uploads through the continue URL ---------------------------------------------------------


async def test_continue_upload_is_listed_on_the_job_and_downloadable(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A PUT through the continue URL answers 201 with the metadata, the job lists it, and the
    API serves the exact bytes as an attachment with the content type given."""
    job = await create_job(client)
    data = b"all tests passed\n"
    response = await upload(anon, job, "report.txt", data)
    assert response.status_code == 201, response.text
    assert response.json() == metadata("report.txt", data)

    got = await client.get(f"/api/v1/jobs/{job['id']}")
    assert got.json()["artifacts"] == [metadata("report.txt", data)]
    assert got.json()["state"] == "pending"

    download = await client.get(f"/api/v1/jobs/{job['id']}/artifacts/report.txt")
    assert download.status_code == 200
    assert download.content == data
    assert download.headers["content-type"] == "text/plain"
    assert download.headers["content-disposition"] == 'attachment; filename="report.txt"'
    assert download.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in download.headers["content-security-policy"]


async def test_upload_without_content_type_is_octet_stream(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """An upload that names no Content-Type is kept as application/octet-stream."""
    job = await create_job(client)
    response = await upload(anon, job, "blob.bin", b"\x00\x01\x02", content_type=None)
    assert response.status_code == 201
    assert response.json()["content_type"] == "application/octet-stream"
    download = await client.get(f"/api/v1/jobs/{job['id']}/artifacts/blob.bin")
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.content == b"\x00\x01\x02"


async def test_reupload_replaces_and_the_list_is_ordered_by_name(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Uploading a name again replaces it (bytes, type, digest); the job lists each name once,
    ordered by name."""
    job = await create_job(client)
    assert (await upload(anon, job, "b.log", b"first")).status_code == 201
    assert (await upload(anon, job, "a.json", b"{}", "application/json")).status_code == 201
    assert (await upload(anon, job, "b.log", b"second", "text/x-log")).status_code == 201

    listed = (await client.get(f"/api/v1/jobs/{job['id']}")).json()["artifacts"]
    assert listed == [
        metadata("a.json", b"{}", "application/json"),
        metadata("b.log", b"second", "text/x-log"),
    ]
    download = await client.get(f"/api/v1/jobs/{job['id']}/artifacts/b.log")
    assert download.content == b"second"
    assert download.headers["content-type"] == "text/x-log"


async def test_upload_counts_as_a_heartbeat(
    app: Starlette, client: httpx.AsyncClient, anon: httpx.AsyncClient, clock: ManualClock
) -> None:
    """An upload pushes the heartbeat deadline as /heartbeat does: silence is measured from it."""
    job = await create_job(client, heartbeat_timeout_s=60)
    clock.advance(50)
    assert (await upload(anon, job, "progress.txt", b"50%")).status_code == 201
    clock.advance(50)
    assert await sweep(app) == 0
    assert (await client.get(f"/api/v1/jobs/{job['id']}")).json()["state"] == "pending"
    clock.advance(11)
    assert await sweep(app) == 1
    failed = (await client.get(f"/api/v1/jobs/{job['id']}")).json()
    assert (failed["state"], failed["failure_reason"]) == ("failed", "heartbeat_timeout")


async def test_upload_over_the_limit_is_413_and_nothing_is_kept(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """One byte over GATEWAY_MAX_ARTIFACT_BYTES -> 413 and nothing stored; at the limit -> 201."""
    job = await create_job(client)
    too_big = await upload(anon, job, "big.bin", b"x" * (MAX_ARTIFACT + 1))
    assert too_big.status_code == 413
    assert too_big.json()["error"] == "too_large"
    assert (await client.get(f"/api/v1/jobs/{job['id']}")).json()["artifacts"] == []
    at_limit = await upload(anon, job, "big.bin", b"x" * MAX_ARTIFACT)
    assert at_limit.status_code == 201
    assert at_limit.json()["size"] == MAX_ARTIFACT


@pytest.mark.parametrize(
    "name",
    ["has space", "x" * 129, "%2E%2E", "%2e", "naïve.txt", "a:b", "semi;colon", 'quote"d'],
)
async def test_invalid_name_is_422(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, name: str
) -> None:
    """A name outside [A-Za-z0-9._-]{1,128}, or `.` and `..` (sent percent-encoded, since
    clients resolve them as path segments), -> 422 and nothing is stored."""
    job = await create_job(client)
    response = await upload(anon, job, name, b"data")
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid"
    assert (await client.get(f"/api/v1/jobs/{job['id']}")).json()["artifacts"] == []


async def test_longest_valid_name_and_every_allowed_character_are_accepted(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """128 characters, and letters, digits, dot, underscore and dash, are a valid name."""
    job = await create_job(client)
    for name in ("n" * 128, "Report_v1.2-final.tar.gz", "...x"):
        response = await upload(anon, job, name, b"ok")
        assert response.status_code == 201, (name, response.text)
        download = await client.get(f"/api/v1/jobs/{job['id']}/artifacts/{name}")
        assert download.content == b"ok"


async def test_too_long_content_type_is_422(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A Content-Type over 255 characters is refused with 422."""
    job = await create_job(client)
    response = await upload(anon, job, "a.txt", b"x", "text/plain; x=" + "y" * 250)
    assert response.status_code == 422


async def test_unknown_or_forged_token_is_404_with_the_continue_body_first(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A forged or unknown token -> 404 with the body every continue route gives, before the
    size or the name is looked at."""
    reference = await anon.post("/continue/forged-token")
    assert reference.status_code == 404
    unknown = ContinueTokens(SECRET_KEY).mint("01ARZ3NDEKTSV4RRFFQ69G5FAV").token
    for token in ("forged-token", unknown):
        for name, data in (
            ("ok.txt", b"x"),
            ("bad name", b"x"),
            ("ok.txt", b"x" * (MAX_ARTIFACT + 1)),
        ):
            response = await anon.put(f"/continue/{token}/artifacts/{name}", content=data)
            assert response.status_code == 404, (token, name, len(data))
            assert response.json() == reference.json()


async def test_upload_on_a_terminal_job_is_409_already_final(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Once the job is terminal, an upload (new or replacing) -> 409 already_final with the
    outcome, and the artifacts stay as they were."""
    job = await create_job(client)
    assert (await upload(anon, job, "keep.txt", b"v1")).status_code == 201
    assert (await anon.post(continue_path(job), json={"status": "failed"})).status_code == 200
    for name in ("keep.txt", "late.txt"):
        response = await upload(anon, job, name, b"v2")
        assert response.status_code == 409
        body = response.json()
        assert (body["error"], body["state"], body["failure_reason"]) == (
            "already_final",
            "failed",
            "callback_failure",
        )
    listed = (await client.get(f"/api/v1/jobs/{job['id']}")).json()["artifacts"]
    assert listed == [metadata("keep.txt", b"v1")]


async def test_upload_before_a_pipeline_jobs_needs_are_met_is_409_not_ready(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """An external pipeline job waiting for its needs answers 409 not_ready, as /log does."""
    response = await client.post(
        "/api/v1/pipelines",
        json={
            "name": "p",
            "jobs": {
                "first": {"kind": "external"},
                "second": {"kind": "external", "needs": ["first"]},
            },
        },
    )
    assert response.status_code == 201, response.text
    second = next(j for j in response.json()["jobs"] if j["name"] == "second")
    answer = await upload(anon, second, "early.txt", b"x")
    assert answer.status_code == 409
    assert answer.json()["error"] == "not_ready"


# --- uploads by the runner --------------------------------------------------------------------


def runner_artifact_path(job_id: str, name: str) -> str:
    return f"/api/v1/runner/jobs/{job_id}/artifacts/{name}"


async def test_runner_upload_while_running(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """The job's runner uploads with its Job-Token while the job runs: 201 with Job-Status, and
    the job lists it."""
    runner = await register_runner(client)
    job = await script_job(client)
    handout = await claim_and_confirm(anon, runner)
    response = await anon.put(
        runner_artifact_path(job["id"], "junit.xml"),
        content=b"<testsuite/>",
        headers={"Job-Token": handout.token, "Content-Type": "application/xml"},
    )
    assert response.status_code == 201, response.text
    assert response.headers["Job-Status"] == "running"
    assert response.json() == metadata("junit.xml", b"<testsuite/>", "application/xml")
    listed = (await client.get(f"/api/v1/jobs/{job['id']}")).json()["artifacts"]
    assert listed == [metadata("junit.xml", b"<testsuite/>", "application/xml")]


async def test_runner_upload_refusals(client: httpx.AsyncClient, anon: httpx.AsyncClient) -> None:
    """No Job-Token -> 401; another job's token -> 403; a hand-out not yet confirmed -> 409
    illegal_transition; a bad name -> 422; too big -> 413; after the exit -> 409 already_final
    with Job-Status."""
    runner = await register_runner(client)
    job = await script_job(client)
    other = await script_job(client, name="other")
    handout = await claim(anon, runner)
    other_handout = await claim_and_confirm(anon, runner)
    assert other_handout.id == other["id"]
    path = runner_artifact_path(job["id"], "out.txt")

    assert (await anon.put(path, content=b"x")).status_code == 401
    wrong = await anon.put(path, content=b"x", headers={"Job-Token": other_handout.token})
    assert wrong.status_code == 403
    early = await anon.put(path, content=b"x", headers={"Job-Token": handout.token})
    assert (early.status_code, early.json()["error"]) == (409, "illegal_transition")
    assert early.headers["Job-Status"] == "pending"

    assert (await put_state(anon, handout, {"state": "running"})).status_code == 200
    bad_name = await anon.put(
        runner_artifact_path(job["id"], "bad name"),
        content=b"x",
        headers={"Job-Token": handout.token},
    )
    assert bad_name.status_code == 422
    too_big = await anon.put(
        path, content=b"x" * (MAX_ARTIFACT + 1), headers={"Job-Token": handout.token}
    )
    assert too_big.status_code == 413

    assert (await put_state(anon, handout, {"state": "success"})).status_code == 200
    late = await anon.put(path, content=b"x", headers={"Job-Token": handout.token})
    assert (late.status_code, late.json()["error"]) == (409, "already_final")
    assert late.headers["Job-Status"] == "success"
    assert (await client.get(f"/api/v1/jobs/{job['id']}")).json()["artifacts"] == []


async def test_async_job_takes_uploads_on_its_continue_url_while_the_script_runs(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """While an async script still runs, an upload through its continue URL is kept (the state
    does not move); the terminal call that follows carries it."""
    runner = await register_runner(client)
    job = await script_job(client, **{"async": True})
    handout = await claim_and_confirm(anon, runner)
    response = await anon.put(f"{handout.continue_path}/artifacts/result.json", content=b"{}")
    assert response.status_code == 201, response.text
    got = (await client.get(f"/api/v1/jobs/{job['id']}")).json()
    assert got["state"] == "running"
    assert [a["name"] for a in got["artifacts"]] == ["result.json"]


# --- downloads ----------------------------------------------------------------------------------


async def test_download_needs_an_api_token_and_names_what_is_missing(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Without a token -> 401; an unknown job or artifact -> 404."""
    job = await create_job(client)
    assert (await upload(anon, job, "a.txt", b"x")).status_code == 201
    assert (await anon.get(f"/api/v1/jobs/{job['id']}/artifacts/a.txt")).status_code == 401
    missing_job = await client.get("/api/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV/artifacts/a.txt")
    assert missing_job.status_code == 404
    missing = await client.get(f"/api/v1/jobs/{job['id']}/artifacts/b.txt")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"


async def test_a_retry_starts_without_artifacts(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A new attempt has no artifacts; the old attempt keeps its own."""
    job = await create_job(client)
    assert (await upload(anon, job, "a.txt", b"x")).status_code == 201
    await anon.post(continue_path(job), json={"status": "failed"})
    retry = await client.post(f"/api/v1/jobs/{job['id']}/retry")
    assert retry.status_code == 201
    assert retry.json()["artifacts"] == []
    old = await client.get(f"/api/v1/jobs/{job['id']}/artifacts/a.txt")
    assert old.content == b"x"


# --- the terminal event ---------------------------------------------------------------------------


class Receiver:
    """A bare HTTP/1.1 receiver on loopback that records each POSTed body and answers 200 (once
    `hold`, when given, is set: a hanging endpoint until then)."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self._hold = hold
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            self.bodies.append(json.loads(await reader.readexactly(length)))
            self.arrived.set()
            if self._hold is not None:
                await self._hold.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        writer.close()

    async def wait_for(self, event_type: str, within_s: float = 10.0) -> dict[str, Any]:
        """The first body of `event_type`, waiting for arrivals up to `within_s` seconds."""
        async with asyncio.timeout(within_s):
            while True:
                for body in self.bodies:
                    if body["type"] == event_type:
                        return body
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def hooked(settings: Settings, clock: ManualClock) -> AsyncIterator[Starlette]:
    """The app with its webhook dispatcher running (the sweeper still driven by hand)."""
    application = create_app(settings, clock=clock, run_sweeper=False, run_dispatcher=True)
    async with application.router.lifespan_context(application):
        yield application


async def test_terminal_event_inlines_the_smallest_artifacts_and_links_the_rest(
    hooked: Starlette, clock: ManualClock
) -> None:
    """The terminal webhook lists every artifact's metadata; smallest first, those whose total
    stays within GATEWAY_WEBHOOK_INLINE_BYTES carry content_base64, the others a signed url
    with url_expires_at, which serves the bytes with no credential."""
    transport = httpx.ASGITransport(app=hooked)
    files = {"c-60.bin": b"c" * 60, "b-50.txt": b"b" * 50, "a-10.txt": b"a" * 10}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        Receiver() as receiver,
        httpx.AsyncClient(transport=transport, base_url=BASE_URL) as anon,
        httpx.AsyncClient(transport=transport, base_url=BASE_URL, headers=admin) as client,
    ):
        job = await create_job(client, state_webhook_url=receiver.url)
        for name, data in files.items():
            assert (await upload(anon, job, name, data)).status_code == 201
        finished_at = clock.now()
        assert (await anon.post(continue_path(job), json={})).status_code == 200
        body = await receiver.wait_for("job.success")

        pending = await receiver.wait_for("job.pending")
        assert pending["data"]["artifacts"] == []
        listed = {entry["name"]: entry for entry in body["data"]["artifacts"]}
        assert list(listed) == sorted(files)
        for name, data in files.items():
            assert {k: listed[name][k] for k in ("name", "content_type", "size", "sha256")} == (
                metadata(name, data)
            )
        # 10 + 50 fit in 100; adding 60 would not.
        for name in ("a-10.txt", "b-50.txt"):
            assert base64.b64decode(listed[name]["content_base64"]) == files[name]
            assert "url" not in listed[name]
        linked = listed["c-60.bin"]
        assert "content_base64" not in linked
        assert linked["url_expires_at"] == rfc3339(int(finished_at) + URL_TTL_S)
        assert linked["url"].startswith(f"{BASE_URL}/artifacts/")
        served = await anon.get(linked["url"].removeprefix(BASE_URL))
        assert served.status_code == 200
        assert served.content == files["c-60.bin"]
        assert served.headers["content-type"] == "text/plain"


async def test_a_deadline_failure_carries_the_artifacts_too(
    app: Starlette,
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    clock: ManualClock,
    settings: Settings,
) -> None:
    """A job failed by the sweeper (callback timeout) lists its artifacts in job.failed, like
    any terminal event; non-terminal events list only the metadata."""
    job = await create_job(client, callback_timeout_s=60)
    assert (await upload(anon, job, "partial.log", b"half")).status_code == 201
    clock.advance(61)
    assert await sweep(app) == 1
    bodies = message_bodies(settings, job["id"])
    (entry,) = bodies["job.failed"]["data"]["artifacts"]
    assert base64.b64decode(entry["content_base64"]) == b"half"
    assert bodies["job.pending"]["data"]["artifacts"] == []


# --- signed links -------------------------------------------------------------------------------


async def _linked_url(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, settings: Settings
) -> tuple[str, bytes]:
    """Finish a job with an artifact too big to inline; its signed URL's path and bytes."""
    job = await create_job(client)
    data = b"z" * (INLINE_BUDGET + 1)
    assert (await upload(anon, job, "big.bin", data, "application/zip")).status_code == 201
    assert (await anon.post(continue_path(job), json={})).status_code == 200
    (entry,) = message_bodies(settings, job["id"])["job.success"]["data"]["artifacts"]
    url: str = entry["url"]
    return url.removeprefix(BASE_URL), data


async def test_signed_url_serves_without_credentials_until_it_expires_then_410(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, clock: ManualClock, settings: Settings
) -> None:
    """The link works with no credential up to GATEWAY_ARTIFACT_URL_TTL_S, then answers 410;
    the API still serves the artifact."""
    path, data = await _linked_url(client, anon, settings)
    served = await anon.get(path)
    assert (served.status_code, served.content) == (200, data)
    assert served.headers["content-type"] == "application/zip"
    clock.advance(URL_TTL_S - 1)
    assert (await anon.get(path)).status_code == 200
    clock.advance(1)
    expired = await anon.get(path)
    assert expired.status_code == 410
    assert expired.json()["error"] == "gone"


async def test_forged_signed_url_is_404(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, settings: Settings
) -> None:
    """A link whose payload or signature was altered, or made up, -> 404 (never the bytes)."""
    path, _ = await _linked_url(client, anon, settings)
    signed = path.removeprefix("/artifacts/")
    payload, _, signature = signed.rpartition(".")
    flipped = "A" if signature[5] != "A" else "B"
    forgeries = [
        f"{payload}.{signature[:5]}{flipped}{signature[6:]}",
        f"{payload[:-2]}xx.{signature}",
        "not-a-link",
        "x" * 2000,
    ]
    for forged in forgeries:
        response = await anon.get(f"/artifacts/{forged}")
        assert response.status_code == 404, forged
        assert response.json()["error"] == "not_found"
