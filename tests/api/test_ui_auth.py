"""Dashboard sign-in, sessions and CSRF over the real app: the session cookie's attributes, where
sign-in may send the browser back to, what ends a session, and which requests must carry the
CSRF token."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.clock import ManualClock
from gateway.config import Settings
from gateway.sessions import SESSION_COOKIE, SESSION_TTL_S, Sessions
from gateway.tokens import token_hash
from gateway.ui.signin import safe_next
from tests.conftest import ADMIN_TOKEN, BASE_URL, SECRET_KEY, continue_path, create_job

PAGES = ["/", "/jobs", "/parked", "/runners", "/webhooks"]
_CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


@pytest.fixture
async def browser(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A client without credentials that keeps cookies, as a browser does."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as http:
        yield http


async def sign_in(http: httpx.AsyncClient, token: str, next_path: str = "/") -> httpx.Response:
    """Fetch the sign-in form (its CSRF cookie) and post the token with the form's fields."""
    form = await http.get("/login", params={"next": next_path})
    assert form.status_code == 200
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert csrf is not None
    return await http.post(
        "/login", data={"token": token, "csrf_token": csrf.group(1), "next": next_path}
    )


def page_csrf(response: httpx.Response) -> str:
    found = _CSRF_META.search(response.text)
    assert found is not None, response.text[:500]
    return found.group(1)


def set_cookie(response: httpx.Response, name: str) -> str:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            return header
    raise AssertionError(f"no Set-Cookie for {name}: {response.headers}")


@pytest.mark.parametrize("path", [*PAGES, "/pipelines/01ARZ3NDEKTSV4RRFFQ69G5FAV", "/jobs/x?a=1"])
async def test_signed_out_pages_redirect_to_login_with_next(
    browser: httpx.AsyncClient, path: str
) -> None:
    """Every page redirects a signed-out visitor to /login, naming the page in `next`."""
    response = await browser.get(path)
    assert response.status_code == 303
    location = httpx.URL(response.headers["location"])
    assert location.path == "/login"
    assert location.params["next"] == path


async def test_signed_out_api_health_and_fragments_answer_json(
    browser: httpx.AsyncClient,
) -> None:
    """API routes keep answering 401 JSON, health stays open, and the pages' own live-region
    requests get 401 JSON (the script then reloads)."""
    api = await browser.get("/api/v1/jobs")
    assert api.status_code == 401
    assert api.json()["error"] == "unauthorized"
    assert (await browser.get("/healthz")).status_code == 200
    fragment = await browser.get("/parked", headers={"X-Gateway-Fragment": "1"})
    assert fragment.status_code == 401
    assert fragment.json()["error"] == "unauthorized"


async def test_sign_in_sets_a_strict_session_cookie_and_goes_back(
    browser: httpx.AsyncClient,
) -> None:
    """An API token signs in: 303 back to `next`, an HttpOnly SameSite=Lax cookie that expires
    in 12 h (not Secure over http); pages and the API then answer with the session."""
    response = await sign_in(browser, ADMIN_TOKEN, "/parked?x=1")
    assert response.status_code == 303
    assert response.headers["location"] == "/parked?x=1"
    cookie = set_cookie(response, SESSION_COOKIE).lower()
    assert "httponly" in cookie
    assert "samesite=lax" in cookie
    assert "path=/" in cookie
    assert f"max-age={SESSION_TTL_S}" in cookie
    assert "secure" not in cookie
    assert ADMIN_TOKEN.lower() not in cookie
    page = await browser.get("/parked")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert (await browser.get("/api/v1/jobs")).status_code == 200


async def test_the_cookie_is_secure_when_the_public_url_is_https(
    settings: Settings, clock: ManualClock, tmp_path: Path
) -> None:
    """With an https GATEWAY_PUBLIC_URL, the session and sign-in cookies are Secure."""
    https = dataclasses.replace(
        settings, data_dir=tmp_path / "https", public_url="https://gateway.example"
    )
    application = create_app(https, clock=clock, run_sweeper=False)
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application), base_url="https://gateway.example"
        ) as http,
    ):
        form = await http.get("/login")
        assert "secure" in set_cookie(form, "gateway_login_csrf").lower()
        response = await sign_in(http, ADMIN_TOKEN)
        assert response.status_code == 303
        assert "secure" in set_cookie(response, SESSION_COOKIE).lower()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/jobs/x?state=failed", "/jobs/x?state=failed"),
        ("/", "/"),
        (None, "/"),
        ("", "/"),
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("jobs", "/"),
        ("/x\r\nSet-Cookie: a=b", "/"),
    ],
)
def test_next_is_a_same_origin_path_only(raw: str | None, expected: str) -> None:
    """Sign-in sends the browser back only to a path of this site."""
    assert safe_next(raw) == expected


async def test_sign_in_never_redirects_off_site(browser: httpx.AsyncClient) -> None:
    """A `next` naming another origin lands on `/`."""
    response = await sign_in(browser, ADMIN_TOKEN, "//evil.example/steal")
    assert response.headers["location"] == "/"


@pytest.mark.parametrize("token", ["gw_wrong", "", "gwj_some-job-token"])
async def test_bad_tokens_do_not_sign_in(browser: httpx.AsyncClient, token: str) -> None:
    """A wrong, empty or job token re-shows the form with a message (401), and no session."""
    response = await sign_in(browser, token)
    assert response.status_code == 401
    assert 'role="alert"' in response.text
    assert SESSION_COOKIE not in browser.cookies
    assert (await browser.get("/")).status_code == 303


async def test_a_runner_token_never_signs_in(
    client: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """A runner token is refused with its own message, prefixed or not."""
    runner = (await client.post("/api/v1/runners", json={})).json()
    response = await sign_in(browser, runner["token"])
    assert response.status_code == 401
    assert "Runner tokens cannot sign in" in response.text
    assert SESSION_COOKIE not in browser.cookies


async def test_sign_in_without_the_forms_csrf_token_is_refused(
    browser: httpx.AsyncClient,
) -> None:
    """A sign-in post without the form's CSRF token (or with another) is 403 and signs no one
    in, even with a good API token."""
    await browser.get("/login")
    missing = await browser.post("/login", data={"token": ADMIN_TOKEN})
    assert missing.status_code == 403
    wrong = await browser.post("/login", data={"token": ADMIN_TOKEN, "csrf_token": "x" * 43})
    assert wrong.status_code == 403
    assert SESSION_COOKIE not in browser.cookies


async def test_session_writes_need_the_csrf_header(
    client: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """With a session, an API write without `X-CSRF-Token` (or with a wrong one) is 403 and
    changes nothing; with the page's token it goes through."""
    job = await create_job(client)
    await sign_in(browser, ADMIN_TOKEN)
    csrf = page_csrf(await browser.get(f"/jobs/{job['id']}"))
    cancel = f"/api/v1/jobs/{job['id']}/cancel"
    missing = await browser.post(cancel)
    assert missing.status_code == 403
    assert missing.json()["error"] == "forbidden"
    wrong = await browser.post(cancel, headers={"X-CSRF-Token": csrf[:-1] + "x"})
    assert wrong.status_code == 403
    assert (await client.get(f"/api/v1/jobs/{job['id']}")).json()["state"] == "pending"
    done = await browser.post(cancel, headers={"X-CSRF-Token": csrf})
    assert done.status_code == 200
    assert done.json()["state"] == "canceled"


async def test_sign_out_needs_the_csrf_token_and_ends_the_session(
    browser: httpx.AsyncClient,
) -> None:
    """POST /logout without the session's CSRF token is 403 and the session stays; with it,
    the cookie is deleted and pages redirect again."""
    await sign_in(browser, ADMIN_TOKEN)
    csrf = page_csrf(await browser.get("/"))
    refused = await browser.post("/logout", data={})
    assert refused.status_code == 403
    assert (await browser.get("/")).status_code == 200
    response = await browser.post("/logout", data={"csrf_token": csrf})
    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    assert "max-age=0" in set_cookie(response, SESSION_COOKIE).lower()
    assert (await browser.get("/")).status_code == 303


async def test_revoking_the_token_ends_its_sessions(
    client: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """A session whose token is revoked ends on its next request: pages redirect, the API and
    the event stream answer 401."""
    created = (await client.post("/api/v1/tokens", json={"name": "laptop"})).json()
    await sign_in(browser, created["token"])
    assert (await browser.get("/")).status_code == 200
    assert (await client.delete(f"/api/v1/tokens/{created['id']}")).status_code == 204
    assert (await browser.get("/")).status_code == 303
    assert (await browser.get("/api/v1/jobs")).status_code == 401
    assert (await browser.get("/api/v1/events/stream")).status_code == 401


async def test_a_replaced_admin_token_ends_its_sessions(
    app: Starlette, browser: httpx.AsyncClient, clock: ManualClock
) -> None:
    """When the admin token is replaced (GATEWAY_ADMIN_TOKEN changed, same token id), sessions
    signed in with the old one end."""
    await sign_in(browser, ADMIN_TOKEN)
    assert (await browser.get("/")).status_code == 200
    await app.state.ctx.store.ensure_api_token(
        "admin", token_hash("gw_the-new-admin-token"), "admin", clock.now()
    )
    assert (await browser.get("/")).status_code == 303


async def test_sessions_expire(browser: httpx.AsyncClient, clock: ManualClock) -> None:
    """A session works until its time limit and not after."""
    await sign_in(browser, ADMIN_TOKEN)
    clock.advance(SESSION_TTL_S - 60)
    assert (await browser.get("/")).status_code == 200
    clock.advance(61)
    assert (await browser.get("/")).status_code == 303
    assert (await browser.get("/api/v1/jobs")).status_code == 401


@pytest.mark.parametrize(
    "tamper",
    [
        lambda value: value[:-2] + ("AA" if not value.endswith("AA") else "BB"),
        lambda value: "x" + value,
        lambda value: "",
        lambda value: "a" * 5000,
    ],
)
async def test_forged_session_cookies_are_refused(browser: httpx.AsyncClient, tamper: Any) -> None:
    """A cookie not signed by this server (tampered, garbage, oversized) is no session."""
    response = await sign_in(browser, ADMIN_TOKEN)
    value = response.cookies[SESSION_COOKIE]
    browser.cookies.clear()
    browser.cookies.set(SESSION_COOKIE, tamper(value), domain="gateway.test")
    assert (await browser.get("/")).status_code == 303
    assert (await browser.get("/api/v1/jobs")).status_code == 401


def test_a_session_signed_with_another_key_is_no_session(clock: ManualClock) -> None:
    """A cookie minted under another secret key does not read."""
    _, value = Sessions("another-secret-key-0123456789", clock).issue("admin", b"h")
    assert Sessions(SECRET_KEY, clock).read(value) is None
    assert Sessions("another-secret-key-0123456789", clock).read(value) is not None


async def test_the_authorization_header_wins_over_the_cookie(
    browser: httpx.AsyncClient,
) -> None:
    """A request with a bearer header is judged by it, whatever session cookie it carries."""
    await sign_in(browser, ADMIN_TOKEN)
    refused = await browser.get("/api/v1/jobs", headers={"Authorization": "Bearer gw_wrong"})
    assert refused.status_code == 401


async def test_a_viewer_session_reads_pages_without_buttons_and_cannot_write(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """A viewer signs in and reads every page; job pages show no Cancel or Retry; its session
    writes are 403 even with the CSRF token."""
    viewer = (await client.post("/api/v1/tokens", json={"name": "wall", "scope": "viewer"})).json()
    pending = await create_job(client, name="pending-one")
    failed = await create_job(client, name="failed-one")
    await anon.post(continue_path(failed), json={"status": "failed"})
    await sign_in(browser, viewer["token"])
    for path in PAGES:
        assert (await browser.get(path)).status_code == 200, path
    pending_page = await browser.get(f"/jobs/{pending['id']}")
    assert "read-only" in pending_page.text
    assert 'data-kind="cancel"' not in pending_page.text
    failed_page = await browser.get(f"/jobs/{failed['id']}")
    assert 'data-kind="retry"' not in failed_page.text
    csrf = page_csrf(pending_page)
    refused = await browser.post(
        f"/api/v1/jobs/{pending['id']}/cancel", headers={"X-CSRF-Token": csrf}
    )
    assert refused.status_code == 403
    assert refused.json()["error"] == "forbidden"
    assert (
        await browser.get("/api/v1/events/stream", params={"last_event_id": "x"})
    ).status_code == 400
