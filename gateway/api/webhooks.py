"""`/api/v1/webhooks` (subscriptions), their delivery logs, a job's deliveries, redelivery."""

from __future__ import annotations

from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.common import Context, authenticated, json, page_response, query_limit, read_body
from gateway.errors import InvalidField
from gateway.models import (
    EndpointPatch,
    EndpointSpec,
    decode_body,
    delivery_to_wire,
    endpoint_to_wire,
)
from gateway.store.base import Signal
from gateway.webhooks import signing
from gateway.webhooks.events import check_patterns
from gateway.webhooks.guard import refusal

T = TypeVar("T")
ROTATION_OVERLAP_S = 24 * 3600


def check_url(ctx: Context, url: str, field: str) -> None:
    """422 for a webhook URL the private-address guard refuses as written."""
    why = refusal(url, ctx.settings.allow_nets)
    if why is not None:
        raise InvalidField(f"`{field}` {why}")


def check_secret(secret: str | None, field: str) -> None:
    if secret is None:
        return
    try:
        signing.secret_key(secret)
    except ValueError as exc:
        raise InvalidField(f"`{field}`: {exc}") from None


def check_subscription(ctx: Context, url: str | None, secret: str | None, where: str = "") -> None:
    """A job's or pipeline's `state_webhook_url` and `state_webhook_secret`, checked as a
    subscription's would be (422)."""
    if url is not None:
        check_url(ctx, url, f"{where}state_webhook_url")
    check_secret(secret, f"{where}state_webhook_secret")


def _check_events(events: list[str]) -> None:
    why = check_patterns(events)
    if why is not None:
        raise InvalidField(f"`events`: {why}")


async def create_webhook(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    spec = decode_body(
        await read_body(request, ctx.settings.max_body_bytes) or b"null", EndpointSpec
    )
    check_url(ctx, spec.url, "url")
    _check_events(spec.events)
    now = ctx.clock.now()
    secret = signing.new_secret()
    endpoint = await ctx.store.create_endpoint(ctx.ids.new(now), spec, secret, now)
    return json({**endpoint_to_wire(endpoint), "secret": secret}, 201)


async def list_webhooks(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    page = await ctx.store.list_endpoints(
        limit=query_limit(request), cursor=request.query_params.get("cursor")
    )
    return page_response(page, endpoint_to_wire)


async def get_webhook(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    return json(endpoint_to_wire(await ctx.store.get_endpoint(request.path_params["webhook_id"])))


async def update_webhook(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    patch = decode_body(
        await read_body(request, ctx.settings.max_body_bytes) or b"null", EndpointPatch
    )
    if patch.url is not None:
        check_url(ctx, patch.url, "url")
    if patch.events is not None:
        _check_events(patch.events)
    endpoint = await ctx.store.update_endpoint(
        request.path_params["webhook_id"], patch, ctx.clock.now()
    )
    return json(endpoint_to_wire(endpoint))


async def delete_webhook(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    await ctx.store.delete_endpoint(request.path_params["webhook_id"], ctx.clock.now())
    return Response(status_code=204)


async def rotate_secret(request: Request) -> Response:
    """A new secret, shown only here; the old one keeps signing beside it for 24 h."""
    ctx, _ = await authenticated(request)
    now = ctx.clock.now()
    secret = signing.new_secret()
    endpoint = await ctx.store.rotate_secret(
        request.path_params["webhook_id"], secret, now + ROTATION_OVERLAP_S, now
    )
    return json({**endpoint_to_wire(endpoint), "secret": secret})


async def webhook_deliveries(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    page = await ctx.store.list_deliveries(
        endpoint_id=request.path_params["webhook_id"],
        limit=query_limit(request),
        cursor=request.query_params.get("cursor"),
    )
    return page_response(page, delivery_to_wire)


async def job_deliveries(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    page = await ctx.store.list_deliveries(
        job_id=request.path_params["job_id"],
        limit=query_limit(request),
        cursor=request.query_params.get("cursor"),
    )
    return page_response(page, delivery_to_wire)


async def redeliver(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    delivery = await ctx.store.redeliver(request.path_params["delivery_id"], ctx.clock.now())
    ctx.signal(frozenset({Signal.DELIVERIES}))
    return json(delivery_to_wire(delivery), 202)


routes = [
    Route("/api/v1/webhooks", create_webhook, methods=["POST"]),
    Route("/api/v1/webhooks", list_webhooks, methods=["GET"]),
    Route("/api/v1/webhooks/{webhook_id}", get_webhook, methods=["GET"]),
    Route("/api/v1/webhooks/{webhook_id}", update_webhook, methods=["PATCH"]),
    Route("/api/v1/webhooks/{webhook_id}", delete_webhook, methods=["DELETE"]),
    Route("/api/v1/webhooks/{webhook_id}/rotate-secret", rotate_secret, methods=["POST"]),
    Route("/api/v1/webhooks/{webhook_id}/deliveries", webhook_deliveries, methods=["GET"]),
    Route("/api/v1/jobs/{job_id}/deliveries", job_deliveries, methods=["GET"]),
    Route("/api/v1/deliveries/{delivery_id}/redeliver", redeliver, methods=["POST"]),
]
