"""`/api/v1/runners`: register (the token is shown once), list, revoke. API token only."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.common import authenticated, json, page_response, query_limit, read_body
from gateway.models import RunnerSpec, decode_body, runner_to_wire
from gateway.tokens import new_runner_token, token_hash


async def register_runner(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    spec = decode_body(await read_body(request, ctx.settings.max_body_bytes) or b"{}", RunnerSpec)
    now = ctx.clock.now()
    token = new_runner_token()
    runner = await ctx.store.create_runner(ctx.ids.new(now), spec, token_hash(token), now)
    return json({**runner_to_wire(runner), "token": token}, 201)


async def list_runners(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    page = await ctx.store.list_runners(
        limit=query_limit(request), cursor=request.query_params.get("cursor")
    )
    return page_response(page, runner_to_wire)


async def revoke_runner(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    await ctx.store.revoke_runner(request.path_params["runner_id"], ctx.clock.now())
    return Response(status_code=204)


routes = [
    Route("/api/v1/runners", register_runner, methods=["POST"]),
    Route("/api/v1/runners", list_runners, methods=["GET"]),
    Route("/api/v1/runners/{runner_id}", revoke_runner, methods=["DELETE"]),
]
