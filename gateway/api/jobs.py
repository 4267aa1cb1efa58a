"""`/api/v1/jobs`: create, read, list, cancel, retry, trace, events."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from gateway.api.common import (
    Context,
    authenticated,
    json,
    page_response,
    query_int,
    query_limit,
    read_body,
)
from gateway.api.webhooks import check_subscription
from gateway.errors import MalformedRequest, NotFound
from gateway.masking import mask_all
from gateway.models import Job, JobSpec, Variable, decode_body, event_to_wire, job_to_wire
from gateway.states import State
from gateway.store.base import Changes

_MASK_WINDOW = 4096


def with_url(ctx: Context, job: Job, changes: Changes) -> dict[str, Any]:
    """The job as GET shows it, plus its continue URL when this answer minted one (the only
    time the URL is ever shown)."""
    body = job_to_wire(job)
    credential = changes.credentials.get(job.id)
    if credential is not None:
        body["continue_url"] = ctx.continue_url(credential.token)
    return body


async def create_job(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    spec = decode_body(await read_body(request, ctx.settings.max_body_bytes) or b"null", JobSpec)
    spec.check()
    check_subscription(ctx, spec.state_webhook_url, spec.state_webhook_secret)
    if spec.callback_timeout_s is None:
        # Nothing waits forever: the server's default is fixed on the job when it is created.
        spec = msgspec.structs.replace(
            spec, callback_timeout_s=ctx.settings.default_callback_timeout_s
        )
    now = ctx.clock.now()
    transition = await ctx.store.create_job(ctx.ids.new(now), spec, ctx.tokens, now)
    ctx.publish(transition.changes)
    return json(with_url(ctx, transition.job, transition.changes), 201)


async def _job_or_404(ctx: Context, job_id: str) -> Job:
    job = await ctx.store.get_job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


async def get_job(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    return json(job_to_wire(await _job_or_404(ctx, request.path_params["job_id"])))


async def list_jobs(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    raw_state = request.query_params.get("state")
    try:
        state = None if raw_state is None else State(raw_state)
    except ValueError:
        raise MalformedRequest(
            f"`state` must be one of {', '.join(s.value for s in State)}"
        ) from None
    page = await ctx.store.list_jobs(
        state=state,
        pipeline_id=request.query_params.get("pipeline_id"),
        limit=query_limit(request),
        cursor=request.query_params.get("cursor"),
    )
    return page_response(page, job_to_wire)


async def cancel_job(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    transition = await ctx.store.cancel_job(request.path_params["job_id"], ctx.clock.now())
    ctx.publish(transition.changes)
    return json(job_to_wire(transition.job))


async def retry_job(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    now = ctx.clock.now()
    transition = await ctx.store.retry_job(
        request.path_params["job_id"], lambda: ctx.ids.new(now), ctx.tokens, now
    )
    ctx.publish(transition.changes)
    body = with_url(ctx, transition.job, transition.changes)
    # Downstream jobs the retry reopened: external ones carry their new continue URL here.
    reopened = [
        event.job_id
        for event in transition.events
        if event.cause == "retry" and event.job_id != transition.job.id
    ]
    if reopened:
        body["reopened"] = [
            with_url(ctx, job, transition.changes)
            for job in [await _job_or_404(ctx, job_id) for job_id in reopened]
        ]
    return json(body, 201)


def secrets_of(
    ctx: Context, job: Job, pipeline_variables: Mapping[str, str | Variable] | None = None
) -> list[bytes]:
    """Values masked when the job's trace is read: its continue token and the masked variables
    of the job and of its pipeline."""
    variables = [*(pipeline_variables or {}).values(), *job.spec.variables.values()]
    found = [
        value.value.encode()
        for value in variables
        if isinstance(value, Variable) and value.masked and value.value
    ]
    if job.token_nonce is not None:
        found.append(ctx.tokens.derive(job.id, job.token_nonce).encode())
    return sorted(found, key=len, reverse=True)


async def read_trace(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    job = await _job_or_404(ctx, request.path_params["job_id"])
    offset = query_int(request, "offset", 0, low=0, high=2**62)
    # Read a little before `offset` so a secret straddling it is still recognised.
    start = max(0, offset - _MASK_WINDOW)
    raw = await ctx.store.read_trace(job.id, start)
    pipeline = None if job.pipeline_id is None else await ctx.store.get_pipeline(job.pipeline_id)
    secrets = secrets_of(ctx, job, None if pipeline is None else pipeline.pipeline.spec.variables)
    head = mask_all(raw[: offset - start], secrets)
    whole = mask_all(raw, secrets)
    return PlainTextResponse(
        whole[len(head) :].decode(errors="replace"),
        headers={"X-Trace-Size": str(start + len(raw))},
    )


async def list_events(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    page = await ctx.store.list_events(
        request.path_params["job_id"],
        limit=query_limit(request),
        cursor=request.query_params.get("cursor"),
    )
    return page_response(page, event_to_wire)


routes = [
    Route("/api/v1/jobs", create_job, methods=["POST"]),
    Route("/api/v1/jobs", list_jobs, methods=["GET"]),
    Route("/api/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/api/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/api/v1/jobs/{job_id}/retry", retry_job, methods=["POST"]),
    Route("/api/v1/jobs/{job_id}/trace", read_trace, methods=["GET"]),
    Route("/api/v1/jobs/{job_id}/events", list_events, methods=["GET"]),
]
