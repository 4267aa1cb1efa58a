"""`/api/v1/runner/...`: the protocol runners speak (docs/runner-protocol.md is normative).

Requesting work needs a runner token (`Authorization: Bearer gwr_...`); the calls about one job
need that job's token (`Job-Token: gwj_...`), valid while the job is handed out or running.
Every answer about a job carries `Job-Status: <state>`; `canceled` tells the runner to kill.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.artifacts import new_upload, upload_problem
from gateway.api.common import Context, context, json, read_body
from gateway.errors import (
    AlreadyFinal,
    IllegalTransition,
    InvalidField,
    MalformedRequest,
    RangeNotSatisfiable,
    Unauthorized,
)
from gateway.models import ExitCode, HandOut, Runner, Variable, artifact_to_wire, decode_body
from gateway.states import RUNNER_REPORTABLE_REASONS, FailureReason, State
from gateway.tokens import new_job_token, token_hash

MAX_WAIT_S = 60
DEFAULT_WAIT_S = 30
# A long poll looks at the queue again this often even without a wake-up (a belt to the
# braces of the wake-up, which a future multi-replica store delivers less reliably).
LONG_POLL_RECHECK_S = 5.0
_RANGE = re.compile(r"^(?:bytes )?(\d{1,15})-(\d{1,15})$")


class JobRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `POST /api/v1/runner/jobs/request`."""

    wait_s: Annotated[int, msgspec.Meta(ge=0, le=MAX_WAIT_S)] = DEFAULT_WAIT_S


class JobUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `PUT /api/v1/runner/jobs/{id}`: a confirmation/keepalive, or the exit."""

    state: Literal["running", "success", "failed"]
    exit_code: ExitCode | None = None
    failure_reason: FailureReason | None = None


async def _runner(ctx: Context, request: Request) -> Runner:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send `Authorization: Bearer <runner token>`")
    runner = await ctx.store.find_runner(token_hash(token.strip()))
    if runner is None:
        raise Unauthorized("the runner token is not valid (API tokens are not runner tokens)")
    return runner


def _job_token(request: Request) -> bytes:
    token = request.headers.get("job-token", "").strip()
    if not token:
        raise Unauthorized("send the job's token in `Job-Token`")
    return token_hash(token)


def _with_status(state: State, body: Any, status_code: int = 200, **headers: str) -> Response:
    return json(body, status_code, headers={"Job-Status": state.value, **headers})


def _job_status_on_errors(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Errors about a job's state carry `Job-Status` too, so a runner learns of a cancel from
    whatever call it makes."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except (AlreadyFinal, IllegalTransition) as exc:
            exc.added_headers["Job-Status"] = str(exc.state)
            raise

    return wrapped


def _variables(ctx: Context, handout: HandOut) -> list[dict[str, Any]]:
    """Later ones win: pipeline variables, job variables, outputs of the needs in `needs`
    order, then the predefined ones."""
    job = handout.job
    merged: dict[str, tuple[str, bool]] = {}
    for source in (handout.pipeline_variables, job.spec.variables):
        for key, value in source.items():
            merged[key] = (
                (value.value, value.masked) if isinstance(value, Variable) else (value, False)
            )
    for outputs in handout.needs_outputs:
        merged.update({key: (value, False) for key, value in outputs.items()})
    merged["CI_JOB_ID"] = (job.id, False)
    merged["CI_JOB_NAME"] = (job.name, False)
    merged["CI_PIPELINE_ID"] = (job.pipeline_id or "", False)
    if handout.continue_token is not None:
        merged["CI_JOB_CONTINUE_URL"] = (ctx.continue_url(handout.continue_token), True)
    return [{"key": k, "value": v, "masked": masked} for k, (v, masked) in merged.items()]


def heartbeat_interval_s(ctx: Context) -> int:
    """How often a running job must be heard from: a fifth of the server's patience."""
    return max(1, ctx.settings.runner_heartbeat_timeout_s // 5)


async def request_job(request: Request) -> Response:
    """Long poll: answer at once with a job, or sleep on the wake-up fired by the commit that
    makes a job pending, until `wait_s` passes (204)."""
    ctx = context(request)
    runner = await _runner(ctx, request)
    raw = await read_body(request, ctx.settings.max_body_bytes)
    wait = decode_body(raw or b"{}", JobRequest)
    loop = asyncio.get_running_loop()
    # The wait is real time on the event loop's clock, not the business clock.
    loop_deadline = loop.time() + wait.wait_s
    while True:
        if await request.is_disconnected():
            # The runner gave up on this poll (it stopped or restarted): a job claimed now
            # would sit unconfirmed until GATEWAY_CONFIRM_TIMEOUT_S.
            return Response(status_code=204)
        job_token = new_job_token()
        ticket = ctx.wakeup.ticket()  # a job made pending during the look still wakes us
        handout = await ctx.store.claim_job(
            runner, token_hash(job_token), ctx.tokens, ctx.clock.now()
        )
        if handout is not None:
            return _handout_response(ctx, handout, job_token)
        remaining = loop_deadline - loop.time()
        if remaining <= 0 or ctx.wakeup.closed:
            return Response(status_code=204)
        await ctx.wakeup.wait(ticket, min(remaining, LONG_POLL_RECHECK_S))


def _handout_response(ctx: Context, handout: HandOut, job_token: str) -> Response:
    job = handout.job
    body = {
        "id": job.id,
        "name": job.name,
        "pipeline_id": job.pipeline_id,
        "attempt": job.attempt,
        "async": job.is_async,
        "script": job.spec.script or [],
        "timeout_s": job.spec.timeout_s,
        "token": job_token,
        "heartbeat_interval_s": heartbeat_interval_s(ctx),
        "variables": _variables(ctx, handout),
    }
    return _with_status(job.state, body, 201)


@_job_status_on_errors
async def update_job(request: Request) -> Response:
    ctx = context(request)
    job_id = request.path_params["job_id"]
    job_token = _job_token(request)
    update = decode_body(await read_body(request, ctx.settings.max_body_bytes), JobUpdate)
    now = ctx.clock.now()
    if update.state == "running":
        transition = await ctx.store.confirm_job(job_id, job_token, now)
    else:
        if update.state == "success" and update.exit_code not in (None, 0):
            raise InvalidField("`success` cannot carry a non-zero `exit_code`")
        if update.state == "success" and update.failure_reason is not None:
            raise InvalidField("`failure_reason` is only for `failed`")
        if update.failure_reason not in (None, *RUNNER_REPORTABLE_REASONS):
            raise InvalidField(
                "a runner may report only `script_failure`, `job_execution_timeout` or"
                " `runner_system_failure`"
            )
        transition = await ctx.store.finish_script(
            job_id,
            job_token,
            succeeded=update.state == "success",
            exit_code=0
            if update.state == "success" and update.exit_code is None
            else update.exit_code,
            reason=update.failure_reason,
            now=now,
        )
    ctx.publish(transition.changes)
    return _with_status(transition.job.state, {"state": transition.job.state.value})


@_job_status_on_errors
async def append_trace(request: Request) -> Response:
    ctx = context(request)
    job_id = request.path_params["job_id"]
    job_token = _job_token(request)
    match = _RANGE.match(request.headers.get("content-range", "").strip())
    if match is None:
        raise MalformedRequest("send `Content-Range: <first>-<last>` (inclusive byte offsets)")
    data = await read_body(request, ctx.settings.max_body_bytes)
    start, last = int(match.group(1)), int(match.group(2))
    if last - start + 1 != len(data):
        raise MalformedRequest(
            f"`Content-Range` {start}-{last} announces {last - start + 1} bytes; the body has"
            f" {len(data)}"
        )
    try:
        appended = await ctx.store.append_trace(job_id, job_token, start, data, ctx.clock.now())
    except RangeNotSatisfiable as exc:
        # Offsets are compared only once the job is known to be running.
        exc.added_headers["Job-Status"] = State.RUNNING.value
        raise
    ctx.publish(appended.changes)
    return _with_status(
        appended.job.state,
        {"size": appended.size},
        202,
        Range=f"0-{appended.size}",
    )


@_job_status_on_errors
async def put_artifact(request: Request) -> Response:
    """Upload an artifact while the job runs (a keepalive, as a trace append is)."""
    ctx = context(request)
    job_token = _job_token(request)
    problem = upload_problem(request)
    if problem is not None:
        raise InvalidField(problem)
    data = await read_body(request, ctx.settings.max_artifact_bytes)
    upload = await new_upload(request, data)
    stored = await ctx.store.put_runner_artifact(
        request.path_params["job_id"], job_token, upload, ctx.clock.now()
    )
    ctx.publish(stored.changes)
    return _with_status(stored.job.state, artifact_to_wire(stored.artifact), 201)


routes = [
    Route("/api/v1/runner/jobs/request", request_job, methods=["POST"]),
    Route("/api/v1/runner/jobs/{job_id}", update_job, methods=["PUT"]),
    Route("/api/v1/runner/jobs/{job_id}/trace", append_trace, methods=["PATCH"]),
    Route("/api/v1/runner/jobs/{job_id}/artifacts/{name}", put_artifact, methods=["PUT"]),
]
