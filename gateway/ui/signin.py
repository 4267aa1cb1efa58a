"""Signing in and out of the dashboard, and the guard every page goes through.

`/login` takes any API token (never a runner or job token) and sets the session cookie
(`gateway.sessions`); `POST /logout` deletes it. A page asked for while signed out redirects to
`/login?next=<the page>`, and sign-in goes back there, to a same-origin path only.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, quote, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from gateway.api.common import Context, context, read_body
from gateway.auth import SignedIn
from gateway.errors import PayloadTooLarge
from gateway.sessions import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    LOGIN_FORM_TTL_S,
    SESSION_COOKIE,
    csrf_matches,
)
from gateway.tokens import JOB_TOKEN_PREFIX, RUNNER_TOKEN_PREFIX, token_hash
from gateway.ui.templating import FRAGMENT_HEADER, Renderer

MAX_FORM_BYTES = 16_384
Page = Callable[[Request, Context, SignedIn], Awaitable[Response]]


def renderer(request: Request) -> Renderer:
    found: Renderer = request.app.state.renderer
    return found


def safe_next(raw: str | None) -> str:
    """`raw` when it is a path on this site, else `/` (never another origin)."""
    if not raw or not raw.startswith("/") or raw.startswith("//") or "\\" in raw:
        return "/"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in raw):
        return "/"
    parts = urlsplit(raw)
    if parts.scheme or parts.netloc:
        return "/"
    return raw


def _secure(ctx: Context) -> bool:
    return (ctx.settings.public_url or "").startswith("https://")


async def read_form(request: Request) -> dict[str, str]:
    """An `application/x-www-form-urlencoded` body (first value of each field)."""
    try:
        raw = await read_body(request, MAX_FORM_BYTES)
    except PayloadTooLarge:
        return {}
    fields = parse_qs(raw.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def page(handler: Page) -> Callable[[Request], Awaitable[Response]]:
    """A dashboard page: signed-out visitors go to `/login?next=...` (a fragment request from
    the pages' script gets 401, and the script reloads)."""

    async def guarded(request: Request) -> Response:
        ctx = context(request)
        signed_in = await ctx.auth.signed_in(request)
        if signed_in is None:
            if request.headers.get(FRAGMENT_HEADER) == "1":
                return JSONResponse(
                    {"error": "unauthorized", "detail": "the session ended; sign in again"},
                    status_code=401,
                )
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        return await handler(request, ctx, signed_in)

    guarded.__name__ = handler.__name__
    guarded.__doc__ = handler.__doc__
    return guarded


def _login_page(
    request: Request, next_path: str, error: str | None = None, status_code: int = 200
) -> Response:
    ctx = context(request)
    csrf = request.cookies.get(LOGIN_CSRF_COOKIE) or ""
    if not (20 <= len(csrf) <= 100 and csrf.isascii()):
        csrf = secrets.token_urlsafe(32)
    response = renderer(request).render(
        request,
        "login.html",
        {"next_path": next_path, "csrf": csrf, "error": error},
        status_code=status_code,
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        csrf,
        max_age=LOGIN_FORM_TTL_S,
        path="/login",
        httponly=True,
        samesite="lax",
        secure=_secure(ctx),
    )
    return response


async def login_form(request: Request) -> Response:
    ctx = context(request)
    next_path = safe_next(request.query_params.get("next"))
    if await ctx.auth.signed_in(request) is not None:
        return RedirectResponse(next_path, status_code=303)
    return _login_page(request, next_path)


async def login(request: Request) -> Response:
    """Check the form's CSRF token and the API token; on success set the session cookie and go
    back to `next`. Runner and job tokens never sign in."""
    ctx = context(request)
    form = await read_form(request)
    next_path = safe_next(form.get("next"))
    if not csrf_matches(request.cookies.get(LOGIN_CSRF_COOKIE, ""), form.get(CSRF_FIELD)):
        return _login_page(request, next_path, "The form expired. Please sign in again.", 403)
    token = form.get("token", "").strip()
    digest = token_hash(token)
    if token.startswith((RUNNER_TOKEN_PREFIX, JOB_TOKEN_PREFIX)) or (
        token and await ctx.store.find_runner(digest) is not None
    ):
        return _login_page(
            request, next_path, "Runner tokens cannot sign in. Use an API token.", 401
        )
    principal = await ctx.store.find_api_token(digest) if token else None
    if principal is None or ctx.auth.sessions is None:
        return _login_page(request, next_path, "That is not a valid API token.", 401)
    _, cookie = ctx.auth.sessions.issue(principal.token_id, digest)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(ctx.auth.sessions.ttl_s),
        path="/",
        httponly=True,
        samesite="lax",
        secure=_secure(ctx),
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


async def logout(request: Request) -> Response:
    """Delete the session cookie; a signed-in request must carry the session's CSRF token."""
    ctx = context(request)
    form = await read_form(request)
    signed_in = await ctx.auth.signed_in(request)
    if signed_in is not None and not csrf_matches(signed_in.session.csrf, form.get(CSRF_FIELD)):
        return renderer(request).render(
            request,
            "error.html",
            {
                "title": "Forbidden",
                "message": "The form carried no valid CSRF token; nothing was done.",
                "signed_in": signed_in,
            },
            status_code=403,
        )
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")
    return response
