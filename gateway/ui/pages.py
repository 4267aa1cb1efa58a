"""The dashboard's pages: pipelines, a pipeline, jobs, a job, parked jobs, runners, webhooks.

Pages read the store directly and render server-side; their script keeps them live from
`GET /api/v1/events/stream` (re-fetching the page's live region on each event) and acts through
the API with the session. Buttons are shown only where the action applies and only to admins.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.common import Context
from gateway.auth import ADMIN_SCOPE, SignedIn
from gateway.errors import MalformedRequest, NotFound
from gateway.models import Job, job_to_wire
from gateway.pipelines import PipelineState, stages
from gateway.states import State
from gateway.ui.signin import page, renderer

PAGE_SIZE = 50
PARKED_LIMIT = 1000
PIPELINE_STATE_ORDER = ["running", "waiting", "pending", "failed", "success", "canceled"]
JOB_STATE_ORDER = ["pending", "running", "waiting", "failed", "success", "canceled", "skipped"]
ARTIFACT_ROUTE = "/api/v1/jobs/{job_id}/artifacts/{name}"
RUNNER_ONLINE_S = 60.0
SLOW_REFRESH_MS = 10_000


async def _values(
    request: Request,
    ctx: Context,
    signed_in: SignedIn,
    nav: str,
    *,
    stream: str | None = "/api/v1/events/stream",
    refresh_ms: int = 0,
    **values: Any,
) -> dict[str, Any]:
    """What every page's layout needs, plus the page's own values."""
    return {
        "signed_in": signed_in,
        "admin": signed_in.principal.scope == ADMIN_SCOPE,
        "csrf": signed_in.session.csrf,
        "nav": nav,
        "now": ctx.clock.now(),
        "stream": stream,
        "last_event_id": await ctx.store.stream_head() if stream else 0,
        "refresh_ms": refresh_ms,
        **values,
    }


def _not_found(request: Request, signed_in: SignedIn, ctx: Context, what: str) -> Response:
    return renderer(request).render(
        request,
        "error.html",
        {
            "title": "Not found",
            "message": f"There is no {what}. It may have been pruned by the retention.",
            "signed_in": signed_in,
            "now": ctx.clock.now(),
        },
        status_code=404,
    )


def _state_filter(request: Request, choices: list[str]) -> str | None:
    raw = request.query_params.get("state") or None
    if raw is not None and raw not in choices:
        raise MalformedRequest(f"`state` must be one of {', '.join(choices)}")
    return raw


@page
async def pipelines_page(request: Request, ctx: Context, signed_in: SignedIn) -> Response:
    """`/`: pipelines, newest first, with their jobs' states; filter by state (and by name in
    the page)."""
    state = _state_filter(request, PIPELINE_STATE_ORDER)
    listed = await ctx.store.list_pipelines(
        state=None if state is None else PipelineState(state),
        limit=PAGE_SIZE,
        cursor=request.query_params.get("cursor"),
    )
    rows = []
    for pipeline in listed.items:
        view = await ctx.store.get_pipeline(pipeline.id)
        rows.append((pipeline, [] if view is None else view.jobs))
    values = await _values(
        request,
        ctx,
        signed_in,
        "pipelines",
        rows=rows,
        state=state,
        states=PIPELINE_STATE_ORDER,
        next_cursor=listed.next_cursor,
    )
    return renderer(request).render(request, "pipelines.html", values)


@page
async def pipeline_page(request: Request, ctx: Context, signed_in: SignedIn) -> Response:
    """`/pipelines/{id}`: the latest attempt of each job, in stages by the longest needs path."""
    pipeline_id = request.path_params["pipeline_id"]
    view = await ctx.store.get_pipeline(pipeline_id)
    if view is None:
        return _not_found(request, signed_in, ctx, f"pipeline {pipeline_id}")
    stage_of = stages({job.name: [n for n in job.needs] for job in view.jobs})
    columns: list[list[Job]] = [[] for _ in range(max(stage_of.values(), default=-1) + 1)]
    for job in view.jobs:
        columns[stage_of[job.name]].append(job)
    values = await _values(
        request,
        ctx,
        signed_in,
        "pipelines",
        stream=f"/api/v1/events/stream?pipeline_id={pipeline_id}",
        pipeline=view.pipeline,
        jobs=view.jobs,
        columns=columns,
    )
    return renderer(request).render(request, "pipeline.html", values)


@page
async def jobs_page(request: Request, ctx: Context, signed_in: SignedIn) -> Response:
    """`/jobs`: standalone jobs (outside pipelines), newest first, filtered by state."""
    state = _state_filter(request, JOB_STATE_ORDER)
    listed = await ctx.store.list_jobs(
        state=None if state is None else State(state),
        pipeline_id=None,
        limit=PAGE_SIZE,
        cursor=request.query_params.get("cursor"),
        standalone=True,
    )
    values = await _values(
        request,
        ctx,
        signed_in,
        "jobs",
        jobs=listed.items,
        state=state,
        states=JOB_STATE_ORDER,
        next_cursor=listed.next_cursor,
    )
    return renderer(request).render(request, "jobs.html", values)


@page
async def job_page(request: Request, ctx: Context, signed_in: SignedIn) -> Response:
    """`/jobs/{id}`: state, timeline, live trace, outputs, result, artifacts, deliveries, and
    the Cancel and Retry buttons where they apply."""
    job_id = request.path_params["job_id"]
    job = await ctx.store.get_job(job_id)
    if job is None:
        return _not_found(request, signed_in, ctx, f"job {job_id}")
    events = await ctx.store.list_events(job.id, limit=500, cursor=None)
    deliveries = await ctx.store.list_deliveries(job_id=job.id, limit=PAGE_SIZE, cursor=None)
    endpoints: dict[str, str] = {}
    for delivery in deliveries.items:
        if delivery.endpoint_id not in endpoints:
            try:
                endpoint = await ctx.store.get_endpoint(delivery.endpoint_id)
                endpoints[delivery.endpoint_id] = endpoint.url
            except NotFound:
                endpoints[delivery.endpoint_id] = "state_webhook_url (implicit)"
    pipeline = None
    if job.pipeline_id is not None:
        view = await ctx.store.get_pipeline(job.pipeline_id)
        pipeline = None if view is None else view.pipeline
    has_artifact_route = any(getattr(r, "path", None) == ARTIFACT_ROUTE for r in request.app.routes)
    values = await _values(
        request,
        ctx,
        signed_in,
        "pipelines" if job.pipeline_id else "jobs",
        stream=f"/api/v1/events/stream?job_id={job.id}",
        job=job,
        wire=job_to_wire(job),
        events=events.items,
        deliveries=deliveries.items,
        endpoints=endpoints,
        pipeline=pipeline,
        artifact_links=has_artifact_route,
    )
    return renderer(request).render(request, "job.html", values)


@page
async def parked_page(request: Request, ctx: Context, signed_in: SignedIn) -> Response:
    """`/parked`: every job whose callback is awaited, longest waiting first, with the time
    left to its deadline and which deadline that is."""
    jobs = await ctx.store.list_parked(PARKED_LIMIT)
    jobs.sort(key=lambda job: (_waiting_since(job), job.id))
    names: dict[str, str] = {}
    for job in jobs:
        if job.pipeline_id is not None and job.pipeline_id not in names:
            view = await ctx.store.get_pipeline(job.pipeline_id)
            names[job.pipeline_id] = "" if view is None else view.pipeline.name
    values = await _values(
        request,
        ctx,
        signed_in,
        "parked",
        jobs=[(job, _waiting_since(job)) for job in jobs],
        pipeline_names=names,
        limit=PARKED_LIMIT,
    )
    return renderer(request).render(request, "parked.html", values)


def _waiting_since(job: Job) -> float:
    """When the callback clock started: parking for an async job; for an external job, when its
    URL went live (its callback deadline minus the callback timeout)."""
    if job.parked_at is not None:
        return job.parked_at
    timeout = job.spec.callback_timeout_s
    if job.deadlines.callback is not None and timeout is not None:
        return job.deadlines.callback - timeout
    return job.created_at


@page
async def runners_page(request: Request, ctx: Context, signed_in: SignedIn) -> Response:
    """`/runners`: when each was last seen and what it runs now."""
    listed = await ctx.store.list_runners(limit=500, cursor=None)
    running: dict[str, Job] = {}
    for runner in listed.items:
        for job_id in runner.running_job_ids:
            job = await ctx.store.get_job(job_id)
            if job is not None:
                running[job_id] = job
    values = await _values(
        request,
        ctx,
        signed_in,
        "runners",
        runners=listed.items,
        running=running,
        online_s=RUNNER_ONLINE_S,
        refresh_ms=SLOW_REFRESH_MS,
    )
    return renderer(request).render(request, "runners.html", values)


@page
async def webhooks_page(request: Request, ctx: Context, signed_in: SignedIn) -> Response:
    """`/webhooks`: endpoints, their failure counts, and which are disabled and why."""
    listed = await ctx.store.list_endpoints(limit=500, cursor=None)
    values = await _values(
        request,
        ctx,
        signed_in,
        "webhooks",
        stream=None,
        endpoints=listed.items,
        refresh_ms=SLOW_REFRESH_MS,
    )
    return renderer(request).render(request, "webhooks.html", values)


routes = [
    Route("/", pipelines_page, methods=["GET"], include_in_schema=False),
    Route("/pipelines/{pipeline_id}", pipeline_page, methods=["GET"], include_in_schema=False),
    Route("/jobs", jobs_page, methods=["GET"], include_in_schema=False),
    Route("/jobs/{job_id}", job_page, methods=["GET"], include_in_schema=False),
    Route("/parked", parked_page, methods=["GET"], include_in_schema=False),
    Route("/runners", runners_page, methods=["GET"], include_in_schema=False),
    Route("/webhooks", webhooks_page, methods=["GET"], include_in_schema=False),
]
