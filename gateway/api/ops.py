"""Operations routes: health, readiness, metrics and the OpenAPI document. No token needed,
except for `/metrics` when `GATEWAY_METRICS_TOKEN` is set."""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.common import context, json
from gateway.errors import Unauthorized


async def healthz(request: Request) -> Response:
    return json({"status": "ok"})


async def readyz(request: Request) -> Response:
    try:
        await context(request).store.ping()
    except Exception:
        return json({"status": "unavailable"}, 503)
    return json({"status": "ready"})


async def metrics(request: Request) -> Response:
    ctx = context(request)
    expected = ctx.settings.metrics_token
    if expected:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthorized("`/metrics` needs `Authorization: Bearer <GATEWAY_METRICS_TOKEN>`")
    return Response(ctx.metrics.exposition(), media_type="text/plain; version=0.0.4")


async def openapi(request: Request) -> Response:
    document = request.app.state.openapi
    return json(document)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
