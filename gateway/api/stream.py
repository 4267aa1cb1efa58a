"""`GET /api/v1/events/stream`: every job and pipeline event as Server-Sent Events.

Each event's `id:` is its global sequence and its `data:` the webhook body of the event.
`?pipeline_id=` and `?job_id=` (which follows the job's later attempts) filter; `Last-Event-ID`
or `?last_event_id=` resumes after that event; without one the stream starts from now. The
stream closes when the server stops; clients resume with the last id they saw.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.api.common import Context, authenticated
from gateway.errors import MalformedRequest
from gateway.models import StreamEvent

KEEPALIVE_S = 15.0
BATCH = 200
_MAX_SEQ_DIGITS = 18


def _resume_from(request: Request) -> str | None:
    return request.headers.get("last-event-id") or request.query_params.get("last_event_id")


def frame(event: StreamEvent) -> bytes:
    """One SSE frame. Bodies are compact JSON on one line, so one `data:` line suffices."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.event_type.encode(), event.body)


async def stream_events(request: Request) -> Response:
    ctx, _ = await authenticated(request)
    head = await ctx.store.stream_head()
    raw = _resume_from(request)
    if raw is None:
        after = head
    elif raw.isascii() and raw.isdigit() and len(raw) <= _MAX_SEQ_DIGITS and int(raw) <= head:
        after = int(raw)
    else:
        raise MalformedRequest("`Last-Event-ID` is not an event id this server handed out")
    pipeline_id = request.query_params.get("pipeline_id")
    job_id = request.query_params.get("job_id")
    return StreamingResponse(
        _frames(ctx, request, after, pipeline_id, job_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _frames(
    ctx: Context, request: Request, after: int, pipeline_id: str | None, job_id: str | None
) -> AsyncIterator[bytes]:
    yield b"retry: 2000\n\n"
    while True:
        ticket = ctx.events.ticket()  # events logged while the read is in flight still wake us
        batch = await ctx.store.read_stream(
            after, pipeline_id=pipeline_id, job_id=job_id, limit=BATCH
        )
        for event in batch:
            yield frame(event)
            after = event.seq
        if len(batch) == BATCH:
            continue
        if ctx.events.closed or await request.is_disconnected():
            return
        if not await ctx.events.wait(ticket, KEEPALIVE_S):
            yield b": keepalive\n\n"


routes = [Route("/api/v1/events/stream", stream_events, methods=["GET"])]
