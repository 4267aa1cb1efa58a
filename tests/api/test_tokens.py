"""API tokens with scopes: admins create, list and revoke them; a viewer token reads everything
and every write answers 403; a revoked token stops at once."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.config import Settings
from tests.conftest import api_client, continue_path, create_job, read_db

SOME_ULID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
_PARAM = re.compile(r"\{[^}]+\}")


async def new_token(client: httpx.AsyncClient, name: str, scope: str | None) -> dict[str, Any]:
    body = {"name": name} if scope is None else {"name": name, "scope": scope}
    response = await client.post("/api/v1/tokens", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def write_routes(app: Starlette) -> list[tuple[str, str]]:
    """Every (method, path) under /api/v1 that is not a read, runner routes aside (they take
    runner and job tokens, never API tokens)."""
    found = []
    for route in app.routes:
        if not isinstance(route, Route) or not route.path.startswith("/api/v1"):
            continue
        if route.path.startswith("/api/v1/runner/"):
            continue
        for method in sorted(route.methods or ()):
            if method not in ("GET", "HEAD"):
                found.append((method, _PARAM.sub(SOME_ULID, route.path)))
    return found


async def test_an_admin_creates_a_viewer_token_shown_once(client: httpx.AsyncClient) -> None:
    """POST /api/v1/tokens answers 201 with the token (once); listing shows it without the
    token."""
    created = await new_token(client, "wall-screen", "viewer")
    assert created["name"] == "wall-screen"
    assert created["scope"] == "viewer"
    assert created["token"].startswith("gw_")
    assert created["revoked_at"] is None
    listed = (await client.get("/api/v1/tokens")).json()
    mine = next(item for item in listed["items"] if item["id"] == created["id"])
    assert "token" not in mine
    assert mine == {key: value for key, value in created.items() if key != "token"}
    assert {item["name"] for item in listed["items"]} == {"admin", "wall-screen"}
    assert listed["next_cursor"] is None


async def test_the_database_keeps_only_the_tokens_hash(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """No byte of a created token is stored; its SHA-256 is."""
    created = await new_token(client, "ci", "admin")
    rows = read_db(settings, "SELECT * FROM api_tokens")
    assert created["token"] not in repr(rows)


async def test_a_viewer_token_reads_and_every_write_is_forbidden(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    """A viewer token reads jobs, pipelines and the event stream's routes; every write route
    answers 403 `forbidden` before looking at the body, and changes nothing."""
    job = await create_job(client)
    viewer = await new_token(client, "viewer", "viewer")
    async with api_client(app, viewer["token"]) as http:
        assert (await http.get("/api/v1/jobs")).status_code == 200
        assert (await http.get(f"/api/v1/jobs/{job['id']}")).status_code == 200
        assert (await http.get("/api/v1/pipelines")).status_code == 200
        assert (await http.get("/api/v1/webhooks")).status_code == 200
        routes = write_routes(app)
        assert ("POST", f"/api/v1/jobs/{SOME_ULID}/cancel") in routes
        for method, path in routes:
            response = await http.request(
                method, path.replace(SOME_ULID, job["id"]), content=b"{not json"
            )
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["error"] == "forbidden"
    assert (await client.get(f"/api/v1/jobs/{job['id']}")).json()["state"] == "pending"
    assert len((await client.get("/api/v1/jobs")).json()["items"]) == 1


async def test_only_admins_manage_tokens(app: Starlette, client: httpx.AsyncClient) -> None:
    """A viewer token cannot list, create or revoke tokens (403)."""
    viewer = await new_token(client, "viewer", "viewer")
    async with api_client(app, viewer["token"]) as http:
        assert (await http.get("/api/v1/tokens")).status_code == 403
        refused = await http.post("/api/v1/tokens", json={"name": "x", "scope": "admin"})
        assert refused.status_code == 403
        assert (await http.delete(f"/api/v1/tokens/{viewer['id']}")).status_code == 403


async def test_scope_defaults_to_admin_and_an_admin_token_writes(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    """A token created without a scope is an admin token: it creates jobs."""
    created = await new_token(client, "deployer", None)
    assert created["scope"] == "admin"
    async with api_client(app, created["token"]) as http:
        assert (await http.post("/api/v1/jobs", json={"name": "x"})).status_code == 201


async def test_a_revoked_token_stops_at_once(app: Starlette, client: httpx.AsyncClient) -> None:
    """DELETE revokes: the token answers 401 on its next call (no cache grace on this server),
    the listing shows when, and a second revoke is 404."""
    created = await new_token(client, "short-lived", "admin")
    async with api_client(app, created["token"]) as http:
        assert (await http.get("/api/v1/jobs")).status_code == 200  # now cached
        assert (await client.delete(f"/api/v1/tokens/{created['id']}")).status_code == 204
        refused = await http.get("/api/v1/jobs")
        assert refused.status_code == 401
    listed = (await client.get("/api/v1/tokens")).json()["items"]
    assert next(t for t in listed if t["id"] == created["id"])["revoked_at"] is not None
    again = await client.delete(f"/api/v1/tokens/{created['id']}")
    assert again.status_code == 404
    assert again.json()["error"] == "not_found"
    assert (await client.delete(f"/api/v1/tokens/{SOME_ULID}")).status_code == 404


async def test_the_bootstrap_admin_token_is_not_revoked_through_the_api(
    client: httpx.AsyncClient,
) -> None:
    """Revoking the `admin` token (from GATEWAY_ADMIN_TOKEN) is 409: it would come back at the
    next start; it keeps working."""
    response = await client.delete("/api/v1/tokens/admin")
    assert response.status_code == 409
    assert response.json()["error"] == "conflict"
    assert (await client.get("/api/v1/jobs")).status_code == 200


async def test_a_live_name_is_unique_and_a_revoked_name_is_reused(
    client: httpx.AsyncClient,
) -> None:
    """A second live token with a name is 409; once the first is revoked, the name is free."""
    first = await new_token(client, "ci", "admin")
    taken = await client.post("/api/v1/tokens", json={"name": "ci"})
    assert taken.status_code == 409
    assert (await client.delete(f"/api/v1/tokens/{first['id']}")).status_code == 204
    second = await new_token(client, "ci", "viewer")
    assert second["id"] != first["id"]
    names = [t["name"] for t in (await client.get("/api/v1/tokens")).json()["items"]]
    assert names.count("ci") == 1


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"", 422),
        (b'{"scope": "viewer"}', 422),
        (b'{"name": "x", "scope": "root"}', 422),
        (b'{"name": "x", "expires": 5}', 422),
        (b'{"name": ""}', 422),
        (b'{"name": "' + b"x" * 129 + b'"}', 422),
    ],
)
async def test_bad_token_bodies_are_refused(
    client: httpx.AsyncClient, body: bytes, status: int
) -> None:
    """Malformed JSON is 400; a missing or invalid name, an unknown scope or field is 422."""
    response = await client.post("/api/v1/tokens", content=body)
    assert response.status_code == status, response.text
    assert len((await client.get("/api/v1/tokens")).json()["items"]) == 1


async def test_runner_tokens_are_not_api_tokens(app: Starlette, client: httpx.AsyncClient) -> None:
    """A runner token cannot call the tokens API (401)."""
    runner = (await client.post("/api/v1/runners", json={})).json()
    async with api_client(app, runner["token"]) as http:
        assert (await http.get("/api/v1/tokens")).status_code == 401


async def test_token_listing_pages_with_a_cursor(client: httpx.AsyncClient) -> None:
    """`limit` and `cursor` page through the tokens; a bad cursor is 400."""
    for index in range(3):
        await new_token(client, f"t{index}", "viewer")
    first = (await client.get("/api/v1/tokens", params={"limit": 2})).json()
    assert len(first["items"]) == 2
    rest = (
        await client.get("/api/v1/tokens", params={"limit": 2, "cursor": first["next_cursor"]})
    ).json()
    seen = [t["id"] for t in first["items"] + rest["items"]]
    assert len(seen) == len(set(seen)) == 4
    assert (await client.get("/api/v1/tokens", params={"cursor": "bogus!"})).status_code == 400


async def test_a_viewer_still_reads_a_continue_url_it_cannot_finish(
    app: Starlette, client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """Scopes apply to API tokens only: continue URLs stay their own credential."""
    job = await create_job(client)
    viewer = await new_token(client, "viewer", "viewer")
    async with api_client(app, viewer["token"]) as http:
        done = await http.post(continue_path(job), json={})
    assert done.status_code == 200
    assert done.json()["state"] == "success"
    assert (await anon.get(continue_path(job))).json()["state"] == "success"
