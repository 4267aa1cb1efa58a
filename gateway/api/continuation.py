"""`/continue/{token}`: the one unauthenticated write route; the token is the credential.

Checks run in the contract's order: token (404, one body for unknown and forged), size (413),
syntax and fields (400/422), then the job's state (409, or the first answer again for an exact
repeat). Nothing is consumed unless the call is applied.
"""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.artifacts import new_upload, upload_problem
from gateway.api.common import Context, context, json, read_body
from gateway.clock import rfc3339
from gateway.errors import GatewayError, InvalidField, NotFound, PayloadTooLarge, StateConflict
from gateway.models import ContinueCall, Job, artifact_to_wire
from gateway.states import Trigger
from gateway.store.base import ContinueOutcome

UNKNOWN_TOKEN_DETAIL = "this continue URL is not valid"
# The answer to a terminal call, the hot path's one response: the same bytes JSONResponse
# renders (compact, UTF-8), encoded without the json module's per-call overhead.
_ANSWER = msgspec.json.Encoder()
MAX_IDEMPOTENCY_KEY = 255


def unknown_token() -> NotFound:
    """The one answer for every unknown or forged token: no oracle."""
    return NotFound(UNKNOWN_TOKEN_DETAIL)


def _token_hash(ctx: Context, request: Request) -> bytes:
    digest = ctx.tokens.verify(request.path_params["token"])
    if digest is None:
        raise unknown_token()
    return digest


def _state_view(job: Job) -> dict[str, object]:
    return {"job_id": job.id, "state": job.state.value, "deadline_at": rfc3339(job.deadline_at)}


async def _body_after_token_check(
    ctx: Context, request: Request, digest: bytes, limit: int | None = None
) -> bytes:
    """The body; an oversized one is refused with 413 only once the token is known valid."""
    try:
        return await read_body(request, limit or ctx.settings.max_body_bytes)
    except PayloadTooLarge:
        if await ctx.store.find_by_continue_token(digest) is None:
            raise unknown_token() from None
        raise


async def _consume(ctx: Context, digest: bytes, call: ContinueCall | GatewayError) -> Response:
    try:
        result = await ctx.store.consume_continue(digest, call, ctx.clock.now())
    except NotFound:
        ctx.metrics.callbacks.labels("not_found").inc()
        raise unknown_token() from None
    except GatewayError as exc:
        ctx.metrics.callbacks.labels(exc.code).inc()
        raise
    ctx.metrics.callbacks.labels(result.outcome.value).inc()
    ctx.publish(result.changes)
    status = 202 if result.outcome is ContinueOutcome.DEFERRED else 200
    body = _ANSWER.encode({"job_id": result.job.id, "state": result.job.state.value})
    return Response(body, status, media_type="application/json")


async def post_continue(request: Request) -> Response:
    ctx = context(request)
    digest = _token_hash(ctx, request)
    raw = await _body_after_token_check(ctx, request, digest)
    key = request.headers.get("idempotency-key")
    call: ContinueCall | GatewayError
    try:
        if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
            raise InvalidField(f"`Idempotency-Key` must be 1-{MAX_IDEMPOTENCY_KEY} characters")
        call = ContinueCall.parse(raw, key)
    except GatewayError as exc:
        call = exc
    return await _consume(ctx, digest, call)


async def get_continue(request: Request) -> Response:
    """Shows the job; completes it only for a job created with `continue_on_get` (never HEAD)."""
    ctx = context(request)
    digest = _token_hash(ctx, request)
    job = await ctx.store.find_by_continue_token(digest)
    if job is None:
        raise unknown_token()
    if request.method == "GET" and job.spec.continue_on_get and not job.state.terminal:
        try:
            result = await ctx.store.consume_continue(
                digest, ContinueCall.parse(b"{}", None), ctx.clock.now()
            )
        except StateConflict:
            pass  # not ready yet, or finished meanwhile: show the state as it is
        else:
            ctx.metrics.callbacks.labels(result.outcome.value).inc()
            ctx.publish(result.changes)
            job = result.job
    return json(_state_view(job))


async def _touch(request: Request, trigger: Trigger, with_log: bool) -> Response:
    ctx = context(request)
    digest = _token_hash(ctx, request)
    log = await _body_after_token_check(ctx, request, digest) if with_log else None
    try:
        transition = await ctx.store.touch_continue(digest, trigger, log, ctx.clock.now())
    except NotFound:
        raise unknown_token() from None
    ctx.publish(transition.changes)
    return json(_state_view(transition.job))


async def start(request: Request) -> Response:
    return await _touch(request, Trigger.START, with_log=False)


async def heartbeat(request: Request) -> Response:
    return await _touch(request, Trigger.HEARTBEAT, with_log=False)


async def append_log(request: Request) -> Response:
    return await _touch(request, Trigger.HEARTBEAT, with_log=True)


async def put_artifact(request: Request) -> Response:
    """Upload an artifact (a heartbeat, as `/log` is). Token (404), size (413), name and
    content type (422), then the job's state (409)."""
    ctx = context(request)
    digest = _token_hash(ctx, request)
    data = await _body_after_token_check(ctx, request, digest, ctx.settings.max_artifact_bytes)
    problem = upload_problem(request)
    if problem is not None:
        if await ctx.store.find_by_continue_token(digest) is None:
            raise unknown_token()
        raise InvalidField(problem)
    upload = await new_upload(request, data)
    try:
        stored = await ctx.store.put_artifact(digest, upload, ctx.clock.now())
    except NotFound:
        raise unknown_token() from None
    ctx.publish(stored.changes)
    return json(artifact_to_wire(stored.artifact), 201)


routes = [
    Route("/continue/{token}", post_continue, methods=["POST"]),
    Route("/continue/{token}", get_continue, methods=["GET", "HEAD"]),
    Route("/continue/{token}/start", start, methods=["POST"]),
    Route("/continue/{token}/heartbeat", heartbeat, methods=["POST"]),
    Route("/continue/{token}/log", append_log, methods=["POST"]),
    Route("/continue/{token}/artifacts/{name}", put_artifact, methods=["PUT"]),
]
