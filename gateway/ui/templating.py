"""Jinja2 for the dashboard: the environment, the filters that put times, durations and
deadlines into words, and `render`, which answers a whole page or only its live region.

A page's live region (its `live` block) is what the pages' script fetches again, with the
`X-Gateway-Fragment: 1` header, when an event arrives: one rendering path for both.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from gateway.models import Job
from gateway.pipelines import PipelineState
from gateway.states import FailureReason, Kind, State

FRAGMENT_HEADER = "x-gateway-fragment"
LIVE_BLOCK = "live"
STATIC_DIR = resources.files("gateway.ui") / "static"

DEADLINE_NAMES: dict[FailureReason | None, str] = {
    FailureReason.CALLBACK_TIMEOUT: "callback timeout",
    FailureReason.HEARTBEAT_TIMEOUT: "heartbeat timeout",
    FailureReason.JOB_EXECUTION_TIMEOUT: "execution timeout",
    FailureReason.RUNNER_SYSTEM_FAILURE: "runner heartbeat",
    FailureReason.QUEUE_TIMEOUT: "queue timeout",
    None: "hand-out confirmation",
}
# Everything the pages load comes from the gateway itself; no inline script.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
CAUSES = {
    "created": "",
    "retry": "a retry of the previous attempt",
    "needs": "its needs finished",
    "hand_out": "handed to a runner",
    "runner": "reported by its runner",
    "callback": "its continue URL was called",
    "continue:start": "the external system started it",
    "cancel": "canceled",
    "pipeline_cancel": "its pipeline was canceled",
    "deadline": "a deadline passed",
}
EVENT_TYPES = [f"job.{s.value}" for s in State] + [f"pipeline.{s.value}" for s in PipelineState]


def duration(seconds: float | None) -> str:
    """`45s`, `4m 05s`, `2h 03m`, `3d 4h`: two units at most."""
    if seconds is None:
        return ""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def time_left(seconds: float) -> str:
    """A countdown that moves every second: `1h 29m 59s`, `4m 05s`, `2d 03h 10m`."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def ago(epoch: float | None, now: float) -> str:
    if epoch is None:
        return ""
    elapsed = now - epoch
    if elapsed < 5:
        return "just now"
    return f"{duration(elapsed)} ago"


def utc(epoch: float | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime(fmt) + " UTC"


def iso(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def ms(epoch: float | None) -> str:
    """Epoch milliseconds, what the pages' script counts with."""
    return "" if epoch is None else str(int(epoch * 1000))


def parked(job: Job) -> bool:
    """Waiting on a callback: an external job pending or running, an async job waiting."""
    if job.kind is Kind.EXTERNAL:
        return job.state in (State.PENDING, State.RUNNING)
    return job.state is State.WAITING


def deadline_name(job: Job) -> str:
    """Which deadline `deadline_at` is, in words (the failure it would give)."""
    earliest = job.deadlines.earliest()
    return "" if earliest is None else DEADLINE_NAMES.get(earliest[1], "deadline")


def flavor(job: Job) -> str:
    if job.kind is Kind.EXTERNAL:
        return "external"
    return "async script" if job.is_async else "script"


def pretty_json(raw: str | None) -> str:
    return "" if raw is None else json.dumps(json.loads(raw), indent=2, ensure_ascii=False)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024 or unit == "MiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _static_versions() -> dict[str, str]:
    """A content hash per static file, so a new release is never served from a stale cache."""
    return {
        entry.name: hashlib.sha256(entry.read_bytes()).hexdigest()[:12]
        for entry in STATIC_DIR.iterdir()
        if entry.is_file()
    }


def build_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gateway.ui", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    versions = _static_versions()
    env.globals.update(
        static=lambda name: f"/static/{name}?v={versions.get(name, '0')}",
        duration=duration,
        time_left=time_left,
        ago=ago,
        utc=utc,
        iso=iso,
        ms=ms,
        parked=parked,
        deadline_name=deadline_name,
        flavor=flavor,
        cause=lambda raw: CAUSES.get(raw, raw.replace("_", " ").replace(":", ": ")),
        pretty_json=pretty_json,
        human_size=human_size,
        event_types=json.dumps(EVENT_TYPES),
    )
    env.globals["ui"] = env.get_template("macros.html").make_module()
    return env


class Renderer:
    """Renders the dashboard's templates into responses."""

    def __init__(self) -> None:
        self.env = build_environment()

    def render(
        self, request: Request, name: str, values: dict[str, Any], status_code: int = 200
    ) -> HTMLResponse:
        """The whole page, or only its live region when the pages' script asks for it."""
        template = self.env.get_template(name)
        if request.headers.get(FRAGMENT_HEADER) == "1" and LIVE_BLOCK in template.blocks:
            context = template.new_context(values)
            html = "".join(template.blocks[LIVE_BLOCK](context))
        else:
            html = template.render(values)
        return HTMLResponse(
            html,
            status_code=status_code,
            headers={
                "Cache-Control": "no-store",
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "X-Frame-Options": "DENY",
                "Referrer-Policy": "same-origin",
            },
        )
