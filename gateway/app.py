"""`create_app`: the one place where the parts are wired, and where errors become HTTP answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from gateway import ui
from gateway.api import (
    artifacts,
    continuation,
    jobs,
    ops,
    pipelines,
    runner,
    runners,
    stream,
    tokens,
    webhooks,
)
from gateway.api.common import Context
from gateway.api.openapi import build_openapi
from gateway.artifacts import ArtifactLinks
from gateway.auth import Authenticator
from gateway.clock import Clock, SystemClock
from gateway.config import Settings
from gateway.errors import (
    AlreadyFinal,
    Forbidden,
    GatewayError,
    Gone,
    IllegalTransition,
    InvalidField,
    MalformedRequest,
    NotFound,
    NotLatestAttempt,
    NotParked,
    NotReady,
    PayloadTooLarge,
    RangeNotSatisfiable,
    StateConflict,
    StoreError,
    Unauthorized,
)
from gateway.keys import ADMIN_TOKEN_FILE, SECRET_KEY_FILE, WEBHOOK_SECRET_FILE, load_or_create
from gateway.metrics import Metrics
from gateway.models import IdGenerator
from gateway.sessions import Sessions
from gateway.store import Store, open_store
from gateway.sweeper import Sweeper
from gateway.tokens import ContinueTokens, key_fingerprint, token_hash
from gateway.webhooks.dispatcher import Dispatcher, DispatchPolicy

log = logging.getLogger("gateway")

# The one table from error class to HTTP status; the most specific class listed first wins.
STATUS_BY_ERROR: list[tuple[type[GatewayError], int]] = [
    (MalformedRequest, 400),
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Gone, 410),
    (AlreadyFinal, 409),
    (NotReady, 409),
    (NotParked, 409),
    (NotLatestAttempt, 409),
    (IllegalTransition, 409),
    (StateConflict, 409),
    (PayloadTooLarge, 413),
    (RangeNotSatisfiable, 416),
    (InvalidField, 422),
]

CLOCK_FOLLOW_INTERVAL_S = 60.0

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def status_of(error: GatewayError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return status
    return 400


def error_response(status: int, code: str, detail: str, **extra: object) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=status)


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    response = error_response(status_of(exc), exc.code, exc.detail, **exc.extra())
    response.headers.update(exc.headers())
    return response


def _allowed_methods(request: Request) -> str:
    """Every method served on the request's path; routes are split per method, and Starlette's
    own 405 names only the first route's."""
    methods = {
        method
        for route in request.app.routes
        if isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE
        for method in route.methods or ()
    }
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and (allowed := _allowed_methods(request)):
        headers["Allow"] = allowed
    return JSONResponse(
        {"error": code, "detail": str(exc.detail)},
        status_code=exc.status_code,
        headers=headers,
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled_error", extra={"path": request.url.path})
    return error_response(500, "internal", "the gateway failed to answer; see its log")


async def _follow_database_clock(store: Store, clock: SystemClock, stop: asyncio.Event) -> None:
    """Keep `clock` on the database's time, so replicas on hosts whose clocks differ judge
    every deadline alike (a no-op for an embedded database)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=CLOCK_FOLLOW_INTERVAL_S)
        if not stop.is_set():
            try:
                clock.offset_s = await store.clock_offset()
            except Exception:
                log.warning("database_clock_unreadable", exc_info=True)


@dataclass(frozen=True)
class StartupInfo:
    """What `gateway serve` tells the operator at start (paths, never secret values)."""

    admin_token_path: Path | None
    admin_token_created: bool
    secret_key_path: Path | None


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    store: Store | None = None,
    run_sweeper: bool = True,
    run_dispatcher: bool | None = None,
) -> Starlette:
    """The ASGI app. Secrets are resolved now (generated into the data dir on first start);
    the store opens and migrates, and the sweeper and the webhook dispatcher start, when the
    app's lifespan starts (tests drive them by hand: `run_sweeper=False`)."""
    clock = clock or SystemClock()
    secret_key = load_or_create(settings.secret_key, settings.data_dir, SECRET_KEY_FILE)
    links = ArtifactLinks(secret_key.value, settings.base_url, settings.artifact_url_ttl_s)
    store = store or open_store(settings, links)
    admin_token = load_or_create(settings.admin_token, settings.data_dir, ADMIN_TOKEN_FILE)
    webhook_secret = load_or_create(settings.webhook_secret, settings.data_dir, WEBHOOK_SECRET_FILE)
    metrics = Metrics()
    ctx = Context(
        settings=settings,
        store=store,
        clock=clock,
        tokens=ContinueTokens(secret_key.value),
        ids=IdGenerator(),
        metrics=metrics,
        auth=Authenticator(store, clock, Sessions(secret_key.value, clock)),
        artifact_links=links,
    )
    sweeper = Sweeper(
        store,
        clock,
        metrics,
        interval_s=settings.sweep_interval_s,
        publish=ctx.publish,
        retention_s=settings.retention_days * 86_400,
    )
    dispatcher = Dispatcher(
        store,
        clock,
        metrics,
        DispatchPolicy(
            schedule=settings.retry_schedule,
            timeout_s=settings.webhook_timeout_s,
            disable_after_s=settings.webhook_disable_after_s,
            concurrency=settings.webhook_concurrency,
            endpoint_concurrency=settings.webhook_endpoint_concurrency,
            allow=settings.allow_nets,
            server_secret=webhook_secret.value,
        ),
    )
    ctx.deliveries_committed = dispatcher.wake
    store.subscribe(ctx.wake)
    if run_dispatcher is None:
        run_dispatcher = run_sweeper

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await store.open()
            await store.claim_secret_fingerprints(
                {
                    "GATEWAY_SECRET_KEY": key_fingerprint(secret_key.value),
                    "GATEWAY_WEBHOOK_SECRET": key_fingerprint(webhook_secret.value),
                }
            )
            await store.ensure_api_token(
                "admin", token_hash(admin_token.value), "admin", clock.now()
            )
        except BaseException as exc:
            # A refused start must not leave the connection's thread behind (the process hangs).
            await store.close()
            if isinstance(exc, StoreError):
                app.state.refusal = str(exc)
            raise
        stop = asyncio.Event()
        tasks = []
        if isinstance(clock, SystemClock):
            clock.offset_s = await store.clock_offset()
            tasks.append(asyncio.create_task(_follow_database_clock(store, clock, stop)))
        if run_sweeper:
            tasks.append(asyncio.create_task(sweeper.run(stop)))
        if run_dispatcher:
            tasks.append(asyncio.create_task(dispatcher.run(stop)))
        try:
            yield
        finally:
            ctx.close()
            stop.set()
            await asyncio.gather(*tasks)
            await store.close()

    app = Starlette(
        routes=[
            # First: the hot path; Starlette tries routes in order (no path overlaps another).
            *continuation.routes,
            *jobs.routes,
            *pipelines.routes,
            *runners.routes,
            *runner.routes,
            *webhooks.routes,
            *stream.routes,
            *artifacts.routes,
            *ops.routes,
            *tokens.routes,
            *ui.routes,
        ],
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.state.refusal = None  # why the store refused to start (another key, a newer schema)
    app.state.sweeper = sweeper
    app.state.dispatcher = dispatcher
    app.state.openapi = build_openapi()
    app.state.renderer = ui.Renderer()
    app.state.startup = StartupInfo(
        admin_token_path=admin_token.path,
        admin_token_created=admin_token.created,
        secret_key_path=secret_key.path,
    )
    return app
