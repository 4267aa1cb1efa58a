"""Authentication: every API route needs a bearer token; ops and continue routes need none;
generated secrets are kept 0600 in the data dir and only hashed in the database."""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.app import create_app
from gateway.clock import ManualClock
from gateway.config import Settings
from gateway.errors import StoreError
from gateway.keys import ADMIN_TOKEN_FILE, SECRET_KEY_FILE
from gateway.tokens import token_hash
from tests.conftest import ADMIN_TOKEN, BASE_URL, continue_path, create_job

SOME_ULID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
METRICS_TOKEN = "metrics-scrape-token-0123456789"
_PARAM = re.compile(r"\{[^}]+\}")


@asynccontextmanager
async def running(
    settings: Settings, clock: ManualClock, token: str | None = None
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """A second app built from `settings`, its lifespan running, with a client (bearer `token`
    when given)."""
    application = create_app(settings, clock=clock, run_sweeper=False)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application), base_url=BASE_URL, headers=headers
        ) as http,
    ):
        yield application, http


def api_endpoints(app: Starlette) -> list[tuple[str, str]]:
    """Every (method, concrete path) of the app under /api/v1, path parameters filled in."""
    found = []
    for route in app.routes:
        if not isinstance(route, Route) or not route.path.startswith("/api/v1"):
            continue
        path = _PARAM.sub(SOME_ULID, route.path)
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                found.append((method, path))
    return found


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["error"] == "unauthorized"
    assert isinstance(body["detail"], str) and body["detail"]


BAD_HEADERS: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer gw_not-a-real-token"},
    {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    {"Authorization": "Basic x"},
    {"Authorization": f"Basic {ADMIN_TOKEN}"},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": ADMIN_TOKEN},
    {"Authorization": ""},
]


async def test_the_app_has_api_routes_to_check(app: Starlette) -> None:
    """The route walk below finds the job routes (so it cannot pass vacuously)."""
    endpoints = api_endpoints(app)
    assert ("POST", "/api/v1/jobs") in endpoints
    assert ("GET", f"/api/v1/jobs/{SOME_ULID}") in endpoints


@pytest.mark.parametrize("headers", BAD_HEADERS, ids=lambda h: h.get("Authorization", "none"))
async def test_every_api_route_refuses_missing_or_bad_credentials(
    app: Starlette, anon: httpx.AsyncClient, client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    """Every /api/v1 route answers 401 with the JSON error shape without a valid bearer token,
    before looking at the body, and changes nothing."""
    job = await create_job(client)
    for method, path in api_endpoints(app):
        path = path.replace(SOME_ULID, job["id"])
        response = await anon.request(method, path, headers=headers, content=b"{not json")
        assert_unauthorized(response)
    stored = (await client.get(f"/api/v1/jobs/{job['id']}")).json()
    assert stored["state"] == "pending"
    assert [item["id"] for item in (await client.get("/api/v1/jobs")).json()["items"]] == [
        job["id"]
    ]


async def test_bearer_scheme_is_case_insensitive(anon: httpx.AsyncClient) -> None:
    """`bearer <token>` works like `Bearer <token>` (the scheme is case-insensitive)."""
    response = await anon.get("/api/v1/jobs", headers={"Authorization": f"bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/metrics"])
async def test_ops_routes_need_no_token(anon: httpx.AsyncClient, path: str) -> None:
    """Health, readiness, the OpenAPI document and metrics answer without a token."""
    response = await anon.get(path)
    assert response.status_code == 200, response.text


async def test_continue_routes_need_no_token(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """The continue URL is its own credential: its routes work without (and ignore) a token."""
    job = await create_job(client)
    path = continue_path(job)
    assert (await anon.get(path)).status_code == 200
    assert (await anon.post(f"{path}/start")).status_code == 200
    assert (await anon.post(f"{path}/heartbeat")).status_code == 200
    assert (await anon.post(f"{path}/log", content=b"hi\n")).status_code == 200
    done = await anon.post(path, json={}, headers={"Authorization": "Bearer wrong"})
    assert done.status_code == 200
    assert done.json()["state"] == "success"
    forged = await anon.post("/continue/forged.token", json={})
    assert forged.status_code == 404


async def test_metrics_token_protects_metrics(
    settings: Settings, clock: ManualClock, tmp_path: Path
) -> None:
    """With GATEWAY_METRICS_TOKEN set, /metrics answers 401 JSON without it and 200 with it;
    the other ops routes stay open."""
    protected = dataclasses.replace(
        settings, data_dir=tmp_path / "metrics", metrics_token=METRICS_TOKEN
    )
    async with running(protected, clock) as (_, http):
        assert_unauthorized(await http.get("/metrics"))
        for header in ("Bearer wrong", f"Basic {METRICS_TOKEN}", "Bearer", ""):
            assert_unauthorized(await http.get("/metrics", headers={"Authorization": header}))
        allowed = await http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert allowed.status_code == 200
        assert "gateway_job_transitions" in allowed.text
        for path in ("/healthz", "/readyz", "/openapi.json"):
            assert (await http.get(path)).status_code == 200


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _database_bytes(settings: Settings) -> bytes:
    """Every byte SQLite keeps for the database (main file, WAL, journal)."""
    base = settings.sqlite_path
    return b"".join(
        candidate.read_bytes()
        for candidate in (base, *(base.with_name(base.name + s) for s in ("-wal", "-journal")))
        if candidate.exists()
    )


async def test_generated_admin_token_is_kept_0600_reused_and_only_hashed(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Without GATEWAY_ADMIN_TOKEN, the first start writes a token 0600 into the data dir that
    works, the next start reuses it, and the database holds only its hash."""
    data_dir = tmp_path / "fresh"
    settings = Settings(data_dir=data_dir, public_url=BASE_URL)
    first = create_app(settings, clock=clock, run_sweeper=False)
    token_file = data_dir / ADMIN_TOKEN_FILE
    assert first.state.startup.admin_token_created is True
    assert first.state.startup.admin_token_path == token_file
    assert _mode(token_file) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32

    async with running(settings, clock, token) as (second, http):
        assert second.state.startup.admin_token_created is False
        assert (data_dir / ADMIN_TOKEN_FILE).read_text().strip() == token
        assert (await http.get("/api/v1/jobs")).status_code == 200
        assert_unauthorized(
            await http.get("/api/v1/jobs", headers={"Authorization": "Bearer " + token[:-1]})
        )

    with sqlite3.connect(settings.sqlite_path) as db:
        rows: list[tuple[Any, ...]] = db.execute("SELECT * FROM api_tokens").fetchall()
        hashes = [row[0] for row in db.execute("SELECT token_hash FROM api_tokens")]
    db.close()
    assert hashes == [token_hash(token)]
    for row in rows:
        for value in row:
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            assert token not in text
    assert token.encode() not in _database_bytes(settings)


async def test_generated_secret_key_is_kept_0600_and_not_in_the_database(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Without GATEWAY_SECRET_KEY, the key is generated 0600 into the data dir, reused on the
    next start (old continue URLs keep working), and never stored in the database."""
    settings = Settings(data_dir=tmp_path / "fresh", admin_token=ADMIN_TOKEN, public_url=BASE_URL)
    async with running(settings, clock, ADMIN_TOKEN) as (first, http):
        key_file = settings.data_dir / SECRET_KEY_FILE
        assert first.state.startup.secret_key_path == key_file
        assert _mode(key_file) == 0o600
        job = await create_job(http)
    key = key_file.read_text().strip()
    assert len(key) >= 32
    async with running(settings, clock, ADMIN_TOKEN) as (_, http):
        assert key_file.read_text().strip() == key
        assert (await http.get(continue_path(job))).status_code == 200
    assert key.encode() not in _database_bytes(settings)


@pytest.mark.parametrize(
    ("field", "variable"),
    [("secret_key", "GATEWAY_SECRET_KEY"), ("webhook_secret", "GATEWAY_WEBHOOK_SECRET")],
)
async def test_a_different_secret_against_the_same_database_refuses_to_start(
    app: Starlette, settings: Settings, clock: ManualClock, field: str, variable: str
) -> None:
    """Starting with another GATEWAY_SECRET_KEY or GATEWAY_WEBHOOK_SECRET on a database used
    with the first fails with StoreError naming it, leaving no database thread behind; the
    original secrets still start."""
    other = dataclasses.replace(settings, **{field: "another-secret-0123456789abcdef"})
    stranger = create_app(other, clock=clock, run_sweeper=False)
    threads_before = set(threading.enumerate())
    with pytest.raises(StoreError, match=variable):
        async with stranger.router.lifespan_context(stranger):
            pass
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(timeout=5)  # a leaked connection thread would keep the process alive
        assert not thread.is_alive(), thread
    async with running(settings, clock, ADMIN_TOKEN) as (_, http):
        assert (await http.get("/api/v1/jobs")).status_code == 200
