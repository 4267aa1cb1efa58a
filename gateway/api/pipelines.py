"""`/api/v1/pipelines`: create a DAG of jobs, read it, list, cancel."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.common import Context, authenticated, json, page_response, query_limit, read_body
from gateway.api.jobs import with_url
from gateway.api.webhooks import check_subscription
from gateway.errors import InvalidField, MalformedRequest, NotFound
from gateway.models import PipelineSpec, PipelineView, decode_body, pipeline_to_wire
from gateway.pipelines import PipelineState, check_dag
from gateway.store.base import Changes


def _checked(ctx: Context, spec: PipelineSpec) -> PipelineSpec:
    """Cross-field rules of every job (errors name the job), the DAG, and the default
    callback timeout fixed on each job that names none."""
    if not spec.jobs:
        raise InvalidField("a pipeline needs at least one job in `jobs`")
    check_dag({name: job.needs for name, job in spec.jobs.items()})
    check_subscription(ctx, spec.state_webhook_url, spec.state_webhook_secret)
    jobs = {}
    for name, job in spec.jobs.items():
        try:
            job.check()
            check_subscription(ctx, job.state_webhook_url, job.state_webhook_secret)
        except InvalidField as exc:
            raise InvalidField(f"job `{name}`: {exc.detail}") from None
        if job.callback_timeout_s is None:
            job = msgspec.structs.replace(
                job, callback_timeout_s=ctx.settings.default_callback_timeout_s
            )
        jobs[name] = job
    return msgspec.structs.replace(spec, jobs=jobs)


def _wire(ctx: Context, view: PipelineView, changes: Changes | None = None) -> dict[str, object]:
    body = pipeline_to_wire(view.pipeline)
    body["jobs"] = [with_url(ctx, job, changes or Changes()) for job in view.jobs]
    return body


async def create_pipeline(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    raw = await read_body(request, ctx.settings.max_body_bytes)
    spec = _checked(ctx, decode_body(raw or b"null", PipelineSpec))
    now = ctx.clock.now()
    pipeline_id = ctx.ids.new(now)
    job_ids = {name: ctx.ids.new(now) for name in spec.jobs}
    result = await ctx.store.create_pipeline(pipeline_id, spec, job_ids, ctx.tokens, now)
    ctx.publish(result.changes)
    return json(_wire(ctx, result.view, result.changes), 201)


async def get_pipeline(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    pipeline_id = request.path_params["pipeline_id"]
    view = await ctx.store.get_pipeline(pipeline_id)
    if view is None:
        raise NotFound(f"no pipeline {pipeline_id}")
    return json(_wire(ctx, view))


async def list_pipelines(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    raw_state = request.query_params.get("state")
    try:
        state = None if raw_state is None else PipelineState(raw_state)
    except ValueError:
        choices = ", ".join(s.value for s in PipelineState)
        raise MalformedRequest(f"`state` must be one of {choices}") from None
    page = await ctx.store.list_pipelines(
        state=state, limit=query_limit(request), cursor=request.query_params.get("cursor")
    )
    return page_response(page, pipeline_to_wire)


async def cancel_pipeline(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    result = await ctx.store.cancel_pipeline(request.path_params["pipeline_id"], ctx.clock.now())
    ctx.publish(result.changes)
    return json(_wire(ctx, result.view))


routes = [
    Route("/api/v1/pipelines", create_pipeline, methods=["POST"]),
    Route("/api/v1/pipelines", list_pipelines, methods=["GET"]),
    Route("/api/v1/pipelines/{pipeline_id}", get_pipeline, methods=["GET"]),
    Route("/api/v1/pipelines/{pipeline_id}/cancel", cancel_pipeline, methods=["POST"]),
]
