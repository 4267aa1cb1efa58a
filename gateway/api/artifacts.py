"""Artifact downloads: `GET /api/v1/jobs/{id}/artifacts/{name}` (API token) and
`GET /artifacts/{signed}` (the expiring link of a terminal event; no other credential). The
uploads live beside their credentials (`continuation`, `runner`) and share the helpers here.

Artifacts are whatever a job uploaded, served from the dashboard's origin: every download is an
attachment that browsers neither sniff nor run scripts in.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.common import authenticated, context
from gateway.artifacts import (
    DEFAULT_CONTENT_TYPE,
    ArtifactUpload,
    content_type_problem,
    name_problem,
)
from gateway.clock import rfc3339
from gateway.errors import Gone, NotFound
from gateway.store.base import ArtifactBlob

INVALID_LINK_DETAIL = "this artifact link is not valid"
# Hashing more than this runs on a worker thread (hashlib releases the GIL), off the loop.
HASH_ON_LOOP_BYTES = 65_536


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").strip() or DEFAULT_CONTENT_TYPE


def upload_problem(request: Request) -> str | None:
    """Why the artifact name in the path or the `Content-Type` cannot be kept, or None."""
    return name_problem(request.path_params["name"]) or content_type_problem(_content_type(request))


async def new_upload(request: Request, data: bytes) -> ArtifactUpload:
    """The upload of `data` under the path's name (checked by `upload_problem`)."""
    name, content_type = request.path_params["name"], _content_type(request)
    if len(data) > HASH_ON_LOOP_BYTES:
        return await asyncio.to_thread(ArtifactUpload.of, name, content_type, data)
    return ArtifactUpload.of(name, content_type, data)


def _download(blob: ArtifactBlob) -> Response:
    artifact = blob.artifact
    return Response(
        blob.data,
        headers={
            "Content-Type": artifact.content_type,
            "Content-Disposition": f'attachment; filename="{artifact.name}"',
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "ETag": f'"{artifact.sha256}"',
        },
    )


async def download(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    job_id, name = request.path_params["job_id"], request.path_params["name"]
    blob = await ctx.store.get_artifact(job_id, name)
    if blob is None:
        if await ctx.store.get_job(job_id) is None:
            raise NotFound(f"no job {job_id}")
        raise NotFound(f"job {job_id} has no artifact {name[:140]!r}")
    return _download(blob)


async def download_by_link(request: Request) -> Response:
    """A forged link -> 404; one past its expiry -> 410 (the job's artifacts stay readable
    with an API token until retention prunes them)."""
    ctx = context(request)
    links = ctx.artifact_links
    target = None if links is None else links.open(request.path_params["signed"])
    if target is None:
        raise NotFound(INVALID_LINK_DETAIL)
    if ctx.clock.now() >= target.expires_at:
        raise Gone(
            f"this artifact link expired at {rfc3339(target.expires_at)};"
            " download the artifact through the API instead"
        )
    blob = await ctx.store.get_artifact(target.job_id, target.name)
    if blob is None:
        raise NotFound("the artifact no longer exists")
    return _download(blob)


routes = [
    Route("/api/v1/jobs/{job_id}/artifacts/{name}", download, methods=["GET"]),
    Route("/artifacts/{signed}", download_by_link, methods=["GET"]),
]
