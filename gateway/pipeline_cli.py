"""`gateway pipeline run FILE.yml [--follow]`: create a pipeline from a GitLab-like YAML file
(`gateway.pipeline_file`) and, with `--follow`, watch every job until the pipeline ends.

On a terminal the progress is a live `rich` table (job, state as a word with icon and color,
attempt, duration, note); otherwise one line per change, so logs and tests can read it.

Exit codes: 0 the pipeline was created (with `--follow`: it ended `success`); 1 it ended in
another state, or the gateway refused or could not be reached; 2 the file is invalid (its line
is named) or the gateway refused its content.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import httpx

from gateway.client import DEFAULT_URL, MissingToken, api_token, gateway_url
from gateway.pipeline_file import PipelineFileError, load_pipeline
from gateway.pipelines import PipelineState

HTTP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.5
RETRY_CAP_S = 5.0
EXIT_SUCCESS, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130

# state -> (icon, rich style). The word is always shown, so the view reads without color.
STATE_LOOK: dict[str, tuple[str, str]] = {
    "created": ("○", "dim"),
    "pending": ("◔", "yellow"),
    "running": ("▶", "bold blue"),
    "waiting": ("⏸", "bold magenta"),
    "success": ("✔", "bold green"),
    "failed": ("✖", "bold red"),
    "canceled": ("⊘", "dim red"),
    "skipped": ("»", "dim"),
}


class PipelineRunError(Exception):
    """The command cannot go on; the message is printed and the exit code is `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --- what the gateway says -------------------------------------------------------------------


def parse_time(value: Any) -> float | None:
    """Epoch seconds of an RFC 3339 time, or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class JobRow:
    """The latest attempt of one job, as the progress view needs it."""

    name: str
    state: str
    attempt: int
    failure_reason: str | None
    started_at: float | None
    finished_at: float | None
    deadline_at: float | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> JobRow:
        attempt = body.get("attempt")
        return cls(
            name=str(body.get("name", "?")),
            state=str(body.get("state", "?")),
            attempt=attempt if isinstance(attempt, int) else 1,
            failure_reason=body.get("failure_reason") or None,
            started_at=parse_time(body.get("started_at")),
            finished_at=parse_time(body.get("finished_at")),
            deadline_at=parse_time(body.get("deadline_at")),
        )

    def duration_s(self, now: float) -> float | None:
        """Time since the job started, up to its end (None before it starts)."""
        if self.started_at is None:
            return None
        return max(0.0, (self.finished_at or now) - self.started_at)

    def note(self, now: float) -> str:
        if self.failure_reason:
            return self.failure_reason
        if self.state == "waiting" and self.deadline_at is not None:
            return f"callback due in {format_duration(self.deadline_at - now)}"
        return ""


@dataclass(frozen=True)
class Snapshot:
    """A pipeline and the latest attempt of each of its jobs."""

    id: str
    name: str
    state: str
    created_at: float | None
    finished_at: float | None
    jobs: tuple[JobRow, ...]

    @classmethod
    def from_json(cls, body: Any) -> Snapshot:
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise PipelineRunError("the gateway answered something that is not a pipeline")
        jobs = body.get("jobs") or []
        return cls(
            id=body["id"],
            name=str(body.get("name", "")),
            state=str(body.get("state", "?")),
            created_at=parse_time(body.get("created_at")),
            finished_at=parse_time(body.get("finished_at")),
            jobs=tuple(JobRow.from_json(job) for job in jobs if isinstance(job, dict)),
        )

    @property
    def ended(self) -> bool:
        return self.state in {s.value for s in PipelineState if s.terminal}


def format_duration(seconds: float) -> str:
    """`4.2s`, `1m05s`, `2h03m`; negative durations read as `0.0s`."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def change_lines(previous: Snapshot | None, current: Snapshot, now: float) -> list[str]:
    """One line per job whose state or attempt changed since `previous` (every job the first
    time), then one for the pipeline's state if it changed."""
    before = {} if previous is None else {job.name: job for job in previous.jobs}
    lines = []
    for job in current.jobs:
        old = before.get(job.name)
        if old is not None and (old.state, old.attempt) == (job.state, job.attempt):
            continue
        line = f"job {job.name}: {job.state}"
        if job.attempt > 1:
            line += f" (attempt {job.attempt})"
        if job.failure_reason:
            line += f" [{job.failure_reason}]"
        duration = job.duration_s(now)
        if job.finished_at is not None and duration is not None:
            line += f" after {format_duration(duration)}"
        lines.append(line)
    if previous is None or previous.state != current.state:
        lines.append(f"pipeline {current.id}: {current.state}")
    return lines


def progress_table(snapshot: Snapshot, now: float) -> Any:
    """The live view: a header line with the pipeline's state, then a table of every job."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    icon, style = STATE_LOOK.get(snapshot.state, ("?", ""))
    header = Text.assemble(
        f"pipeline {snapshot.name} ({snapshot.id}): ", (f"{icon} {snapshot.state}", style)
    )
    if snapshot.created_at is not None:
        header.append(f"  {format_duration((snapshot.finished_at or now) - snapshot.created_at)}")
    table = Table()
    table.add_column("job")
    table.add_column("state")
    table.add_column("attempt", justify="right")
    table.add_column("duration", justify="right")
    table.add_column("note", style="dim")
    for job in snapshot.jobs:
        icon, style = STATE_LOOK.get(job.state, ("?", ""))
        duration = job.duration_s(now)
        table.add_row(
            job.name,
            Text(f"{icon} {job.state}", style=style),
            str(job.attempt),
            "-" if duration is None else format_duration(duration),
            job.note(now),
        )
    return Group(header, table)


# --- talking to the gateway ------------------------------------------------------------------


def api_client(args: argparse.Namespace) -> httpx.Client:
    try:
        token = api_token(args.token, args.data_dir)
    except MissingToken as exc:
        raise PipelineRunError(str(exc)) from None
    return httpx.Client(
        base_url=gateway_url(args.url),
        headers={"Authorization": f"Bearer {token}"},
        timeout=HTTP_TIMEOUT_S,
    )


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return f"{response.status_code} {body.get('error')}: {body.get('detail')}"
    return f"{response.status_code} {response.text[:200]}"


def create_pipeline(client: httpx.Client, body: dict[str, Any], filename: str) -> Any:
    """POST the pipeline; its JSON. A 400/422 means the file's content is refused (exit 2)."""
    try:
        response = client.post("/api/v1/pipelines", json=body)
    except httpx.HTTPError as exc:
        raise PipelineRunError(f"cannot reach the gateway: {exc}") from None
    if response.status_code in (400, 422):
        raise PipelineRunError(
            f"{filename}: the gateway refused the pipeline: {_error_text(response)}", EXIT_INVALID
        )
    if response.status_code != 201:
        raise PipelineRunError(f"cannot create the pipeline: {_error_text(response)}")
    return response.json()


def poll_pipeline(
    client: httpx.Client,
    pipeline_id: str,
    *,
    interval_s: float = POLL_INTERVAL_S,
    warn: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Snapshot]:
    """Snapshots every `interval_s` until the pipeline ends (the last one is the ended one).
    A transport error or a 5xx is waited out with a growing delay; other errors raise."""
    delay = interval_s
    while True:
        started = time.monotonic()
        try:
            response = client.get(f"/api/v1/pipelines/{pipeline_id}")
        except httpx.TransportError as exc:
            problem = f"cannot reach the gateway ({type(exc).__name__})"
        else:
            if response.status_code == 200:
                delay = interval_s
                snapshot = Snapshot.from_json(response.json())
                yield snapshot
                if snapshot.ended:
                    return
                sleep(max(0.0, interval_s - (time.monotonic() - started)))
                continue
            problem = _error_text(response)
            if response.status_code < 500:
                raise PipelineRunError(f"cannot read pipeline {pipeline_id}: {problem}")
        warn(f"{problem}; retrying in {delay:.1f}s")
        sleep(delay)
        delay = min(delay * 2, RETRY_CAP_S)


def follow_lines(snapshots: Iterator[Snapshot], out: TextIO) -> Snapshot | None:
    """Print one line per change (for logs); the last snapshot."""
    previous = None
    for snapshot in snapshots:
        now = time.time()
        for line in change_lines(previous, snapshot, now):
            print(f"{time.strftime('%H:%M:%S')} {line}", file=out, flush=True)
        previous = snapshot
    return previous


def follow_live(snapshots: Iterator[Snapshot], out: TextIO) -> Snapshot | None:
    """Redraw the progress table on every snapshot; the last snapshot."""
    from rich.console import Console
    from rich.live import Live

    last = None
    console = Console(file=out)
    with Live(console=console, auto_refresh=False, transient=False) as live:
        for snapshot in snapshots:
            live.update(progress_table(snapshot, time.time()), refresh=True)
            last = snapshot
    return last


# --- command line ----------------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `gateway pipeline run FILE.yml [--follow]`."""
    pipeline = subparsers.add_parser("pipeline", help="create and follow pipelines")
    commands = pipeline.add_subparsers(title="pipeline commands")
    run = commands.add_parser(
        "run",
        help="create a pipeline from a YAML file; --follow shows its progress until it ends",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    run.add_argument("file", help="the pipeline file (GitLab-like YAML)")
    run.add_argument(
        "--follow", action="store_true", help="show progress; exit 0 only if it ends in success"
    )
    run.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a pipeline variable, over the file's (repeatable)",
    )
    run.add_argument("--url", help=f"gateway address (GATEWAY_URL, {DEFAULT_URL})")
    run.add_argument("--token", help="API token (GATEWAY_TOKEN, else the data dir's)")
    run.add_argument("--data-dir", help="where to find the admin token (GATEWAY_DATA_DIR)")
    run.add_argument(
        "--poll-interval-s", type=float, default=POLL_INTERVAL_S, help=argparse.SUPPRESS
    )
    run.set_defaults(run=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except PipelineFileError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except PipelineRunError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return exc.exit_code


def _run(args: argparse.Namespace) -> int:
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineRunError(f"cannot read {args.file}: {exc}", EXIT_INVALID) from None
    body = load_pipeline(text, args.file)
    variables = body.setdefault("variables", {})
    for item in args.var:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PipelineRunError(f"--var must be KEY=VALUE, got {item!r}", EXIT_INVALID)
        if not isinstance(variables, dict):
            raise PipelineRunError(f"{args.file}: `variables` must be a mapping", EXIT_INVALID)
        variables[key] = value
    with api_client(args) as client:
        created = create_pipeline(client, body, args.file)
        snapshot = Snapshot.from_json(created)
        print(f"pipeline {snapshot.id} created: {snapshot.name} ({len(snapshot.jobs)} jobs)")
        for job in created.get("jobs") or []:
            if isinstance(job, dict) and job.get("continue_url"):
                print(f"continue URL of {job.get('name')}: {job['continue_url']}")
        sys.stdout.flush()
        if not args.follow:
            return EXIT_SUCCESS
        return _follow(client, snapshot, args.poll_interval_s)


def _follow(client: httpx.Client, created: Snapshot, interval_s: float) -> int:
    def warn(message: str) -> None:
        print(f"gateway: {message}", file=sys.stderr, flush=True)

    snapshots = poll_pipeline(client, created.id, interval_s=interval_s, warn=warn)
    follow = follow_live if sys.stdout.isatty() else follow_lines
    try:
        last = follow(snapshots, sys.stdout)
    except KeyboardInterrupt:
        print(f"stopped following; pipeline {created.id} goes on", file=sys.stderr)
        return EXIT_INTERRUPTED
    if last is None:
        return EXIT_FAILED
    took = ""
    if last.created_at is not None and last.finished_at is not None:
        took = f" in {format_duration(last.finished_at - last.created_at)}"
    print(f"pipeline {last.id} ended {last.state}{took}", flush=True)
    return EXIT_SUCCESS if last.state == PipelineState.SUCCESS.value else EXIT_FAILED
