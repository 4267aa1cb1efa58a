"""`/api/v1/tokens`: API tokens with a scope (`admin` writes, `viewer` only reads). Admin only.

A token is shown once, in the answer that creates it; the database keeps its SHA-256.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.common import authenticated, json, page_response, query_limit, read_body
from gateway.models import NAME_PATTERN, api_token_to_wire, decode_body
from gateway.tokens import new_api_token, token_hash


class TokenSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `POST /api/v1/tokens`."""

    name: Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, description="1-128 characters")]
    scope: Literal["admin", "viewer"] = "admin"


async def create_token(request: Request) -> Response:
    ctx, _ = await authenticated(request, admin=True)
    spec = decode_body(await read_body(request, ctx.settings.max_body_bytes) or b"null", TokenSpec)
    now = ctx.clock.now()
    token = new_api_token()
    stored = await ctx.store.create_api_token(
        ctx.ids.new(now), spec.name, token_hash(token), spec.scope, now
    )
    return json({**api_token_to_wire(stored), "token": token}, 201)


async def list_tokens(request: Request) -> Response:
    ctx, _ = await authenticated(request, admin=True)
    page = await ctx.store.list_api_tokens(
        limit=query_limit(request), cursor=request.query_params.get("cursor")
    )
    return page_response(page, api_token_to_wire)


async def revoke_token(request: Request) -> Response:
    """Revoke a token: its bearer calls and its dashboard sessions stop working."""
    ctx, _ = await authenticated(request, admin=True)
    await ctx.store.revoke_api_token(request.path_params["token_id"], ctx.clock.now())
    ctx.auth.forget()
    return Response(status_code=204)


routes = [
    Route("/api/v1/tokens", create_token, methods=["POST"]),
    Route("/api/v1/tokens", list_tokens, methods=["GET"]),
    Route("/api/v1/tokens/{token_id}", revoke_token, methods=["DELETE"]),
]
