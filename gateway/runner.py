"""The reference runner: a shell executor that pulls script jobs from a gateway and runs them.

The protocol (PRODUCT.md, "Runner API"): long-poll `POST /api/v1/runner/jobs/request`, confirm
with `PUT /api/v1/runner/jobs/{id}` `{"state": "running"}` before starting anything, stream the
masked output with `PATCH .../trace` (offset-addressed; a 416 names the size to resume from),
keep the job alive with the same idempotent PUT while the script is silent, and report the exit
with `PUT {"state": "success"|"failed", "exit_code"}`. Every job response carries `Job-Status`;
anything but `running` (or a 401/403/404/409) while the script runs kills its process group.

Pure parts, tested on their own: `Masker` (streaming, chunk-split safe), `TraceLog` (the trace
and the gateway's acknowledged size), `backoff_delay`/`Backoff`. `run_script` runs one bash
script in its own process group and is what `Runner` drives for each job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx

from gateway import __version__, logs
from gateway.client import DEFAULT_URL, MissingToken, api_token, gateway_url
from gateway.masking import Masker

log = logging.getLogger("gateway.runner")

MAX_PATCH_BYTES = 64 * 1024
TRACE_INTERVAL_S = 1.0
DEFAULT_TRACE_LIMIT_BYTES = 16 * 1024 * 1024
DEFAULT_POLL_WAIT_S = 30
MIN_POLL_INTERVAL_S = 1.0
DEFAULT_HEARTBEAT_INTERVAL_S = 30.0
CANCEL_CHECK_S = 5.0  # a silent script learns of a cancel within this
DEFAULT_KILL_GRACE_S = 3.0
DEFAULT_SHUTDOWN_GRACE_S = 30.0
DRAIN_TIMEOUT_S = 2.0
CONFIRM_BUDGET_S = 60.0
REPORT_BUDGET_S = 300.0
SHUTDOWN_REPORT_BUDGET_S = 10.0
HTTP_TIMEOUT_S = 30.0
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
BACKOFF_JITTER = 0.5
READ_SIZE = 64 * 1024
# What a job's environment takes from the runner's own; job variables win over these.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Job calls answered with these mean the gateway no longer lets us run the job.
JOB_GONE = frozenset({401, 403, 404, 409})
RETRYABLE = frozenset({429}) | frozenset(range(500, 600))


# --- trace bookkeeping -------------------------------------------------------------------------


@dataclass(frozen=True)
class TracePatch:
    """One `PATCH .../trace`: `body` goes at byte offset `start` of the job's trace."""

    start: int
    body: bytes

    @property
    def end(self) -> int:
        """Offset of the last byte (inclusive, as `Content-Range` says it)."""
        return self.start + len(self.body) - 1

    @property
    def content_range(self) -> str:
        return f"{self.start}-{self.end}"


class TraceLog:
    """A job's masked trace as the runner produced it, and how much of it the gateway holds.

    Positions are byte offsets into the trace. Everything produced is kept (up to `limit_bytes`,
    then a truncation notice), so the runner can resend from whatever size the gateway reports:
    `acknowledge` takes the size of a 202's or a 416's `Range` alike.
    """

    def __init__(self, limit_bytes: int = DEFAULT_TRACE_LIMIT_BYTES) -> None:
        self._data = bytearray()
        self._origin = 0
        self._sent = 0
        self._limit = limit_bytes
        self.truncated = False

    @property
    def size(self) -> int:
        """Bytes produced so far."""
        return self._origin + len(self._data)

    @property
    def sent(self) -> int:
        """Bytes the gateway said it holds."""
        return self._sent

    @property
    def pending(self) -> int:
        return self.size - self._sent

    def append(self, data: bytes) -> None:
        """Add output; past the limit it is dropped, after a one-time notice."""
        if self.truncated or not data:
            return
        room = self._limit - len(self._data)
        if len(data) <= room:
            self._data += data
            return
        self._data += data[: max(room, 0)]
        self._data += f"\n[runner: trace truncated at {self._limit} bytes]\n".encode()
        self.truncated = True

    def next_patch(self, max_bytes: int = MAX_PATCH_BYTES) -> TracePatch | None:
        """The next unsent slice (at most `max_bytes`), or None when all is sent."""
        if self.pending <= 0:
            return None
        begin = self._sent - self._origin
        return TracePatch(self._sent, bytes(self._data[begin : begin + max_bytes]))

    def acknowledge(self, server_size: int) -> None:
        """The gateway holds `server_size` bytes: the next patch starts there.

        Below what we produced (a lost patch, or an overlap already applied) it is simply the
        resume point. Beyond it the gateway knows bytes we never made (should not happen): keep
        what is unsent and place it at the gateway's end, so the stream goes on rather than loop.
        """
        if server_size < 0:
            raise ValueError("a trace size cannot be negative")
        if self._origin <= server_size <= self.size:
            self._sent = server_size
            return
        unsent = self._data[self._sent - self._origin :] if self._sent >= self._origin else b""
        self._data = bytearray(unsent)
        self._origin = server_size
        self._sent = server_size


def parse_range_size(value: str | None) -> int | None:
    """The size in a `Range: 0-<size>` answer (`bytes 0-N` and `bytes=0-N` too), or None."""
    if not value:
        return None
    text = value.strip()
    for prefix in ("bytes=", "bytes "):
        if text.startswith(prefix):
            text = text[len(prefix) :].strip()
    first, sep, last = text.partition("-")
    if not sep or not (first + last).isascii() or not first.isdigit() or not last.isdigit():
        return None
    return int(last)


# --- backoff -----------------------------------------------------------------------------------


def backoff_delay(
    attempt: int,
    *,
    base_s: float = BACKOFF_BASE_S,
    cap_s: float = BACKOFF_CAP_S,
    jitter: float = BACKOFF_JITTER,
    rand: float = 1.0,
) -> float:
    """Delay before retry number `attempt` (0 first): `base * 2**attempt`, capped at `cap_s`,
    then scaled into `[(1 - jitter) * d, d]` by `rand` in [0, 1]."""
    if attempt < 0 or not 0.0 <= jitter <= 1.0 or not 0.0 <= rand <= 1.0:
        raise ValueError("attempt >= 0, jitter and rand in [0, 1]")
    ceiling = cap_s if attempt >= 64 else min(cap_s, base_s * 2.0**attempt)
    return ceiling * (1.0 - jitter * (1.0 - rand))


class Backoff:
    """Successive `backoff_delay`s with injected randomness; `reset` after a success."""

    def __init__(
        self,
        *,
        base_s: float = BACKOFF_BASE_S,
        cap_s: float = BACKOFF_CAP_S,
        jitter: float = BACKOFF_JITTER,
        rng: random.Random | None = None,
    ) -> None:
        self._base_s = base_s
        self._cap_s = cap_s
        self._jitter = jitter
        self._rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        delay = backoff_delay(
            self.attempt,
            base_s=self._base_s,
            cap_s=self._cap_s,
            jitter=self._jitter,
            rand=self._rng.random(),
        )
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


def retry_after_s(value: str | None) -> float | None:
    """A `Retry-After` given in seconds, or None (HTTP dates are not worth honouring here)."""
    if value and value.strip().isascii() and value.strip().isdigit():
        return float(value.strip())
    return None


# --- running one script ------------------------------------------------------------------------


@dataclass(frozen=True)
class ScriptResult:
    """How a script ended. `exit_code` is the shell's: 128 + N when signal N killed it."""

    exit_code: int
    timed_out: bool = False
    killed: bool = False


def script_text(lines: Sequence[str]) -> str:
    """The bash program for a job's script lines: stop at the first failing command or pipe."""
    return "set -eo pipefail\n" + "".join(f"{line}\n" for line in lines)


async def run_script(
    script: Sequence[str],
    *,
    env: Mapping[str, str],
    on_output: Callable[[bytes], None],
    cwd: str | Path | None = None,
    timeout_s: float | None = None,
    kill: asyncio.Event | None = None,
    kill_grace_s: float = DEFAULT_KILL_GRACE_S,
) -> ScriptResult:
    """Run `script` with bash in a new session (its own process group) and wait for it.

    stdout and stderr go, merged and in order, to `on_output` chunk by chunk (at most
    `READ_SIZE` bytes each). When `timeout_s` passes or `kill` is set, the group gets SIGTERM,
    then SIGKILL after `kill_grace_s`. Whatever happens, when the script's shell has exited its
    leftover background processes are killed too, and the output still in the pipe is read for
    up to `DRAIN_TIMEOUT_S`. Cancelling this coroutine kills the group. Raises OSError when bash
    cannot be started.
    """
    loop = asyncio.get_running_loop()
    script_dir = await asyncio.to_thread(tempfile.mkdtemp, prefix="gateway-script-")
    try:
        path = Path(script_dir) / "script.sh"
        await asyncio.to_thread(path.write_text, script_text(script))
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                "bash",
                "--noprofile",
                "--norc",
                str(path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
                os.fdopen(read_fd, "rb", 0),
            )
        except BaseException:
            _signal_group(proc.pid, signal.SIGKILL)
            raise
        try:
            return await _supervise(proc, reader, on_output, timeout_s, kill, kill_grace_s)
        finally:
            transport.close()
    finally:
        await asyncio.to_thread(shutil.rmtree, script_dir, True)


async def _supervise(
    proc: asyncio.subprocess.Process,
    reader: asyncio.StreamReader,
    on_output: Callable[[bytes], None],
    timeout_s: float | None,
    kill: asyncio.Event | None,
    kill_grace_s: float,
) -> ScriptResult:
    pgid = proc.pid  # start_new_session: the shell leads its own group

    async def pump() -> None:
        while chunk := await reader.read(READ_SIZE):
            on_output(chunk)

    pumping = asyncio.create_task(pump())
    exited = asyncio.create_task(proc.wait())
    told = asyncio.create_task(kill.wait()) if kill is not None else None
    timed_out = killed = False
    try:
        watched = {exited} if told is None else {exited, told}
        done, _ = await asyncio.wait(
            watched, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if exited not in done:
            killed = told is not None and told in done
            timed_out = not killed
            _signal_group(pgid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), timeout=kill_grace_s)
        _signal_group(pgid, signal.SIGKILL)
        returncode = await exited
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pumping), timeout=DRAIN_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            _signal_group(pgid, signal.SIGKILL)
        for task in (pumping, exited, told):
            if task is not None and not task.done():
                task.cancel()
    exit_code = returncode if returncode >= 0 else 128 - returncode
    return ScriptResult(exit_code=exit_code, timed_out=timed_out, killed=killed)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


# --- the job payload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JobVariable:
    key: str
    value: str = field(repr=False)
    masked: bool = False


@dataclass(frozen=True)
class JobPayload:
    """A job as `POST /api/v1/runner/jobs/request` hands it out (201)."""

    id: str
    name: str
    pipeline_id: str | None
    attempt: int
    is_async: bool
    script: tuple[str, ...]
    timeout_s: float | None
    token: str = field(repr=False)
    heartbeat_interval_s: float
    variables: tuple[JobVariable, ...] = field(repr=False)

    @classmethod
    def from_json(cls, body: Any) -> JobPayload:
        """Check and convert a hand-out body; raises ValueError naming what is wrong."""
        if not isinstance(body, dict):
            raise ValueError("the job is not a JSON object")
        job_id, token = body.get("id"), body.get("token")
        if not isinstance(job_id, str) or not job_id or not isinstance(token, str) or not token:
            raise ValueError("the job has no `id` or `token`")
        script = body.get("script") or []
        if not isinstance(script, list) or not all(isinstance(line, str) for line in script):
            raise ValueError("`script` is not a list of strings")
        variables = []
        for item in body.get("variables") or []:
            if not isinstance(item, dict) or not isinstance(item.get("key"), str):
                raise ValueError("a variable is not `{key, value, masked}`")
            value = item.get("value")
            variables.append(
                JobVariable(
                    key=item["key"],
                    value="" if value is None else str(value),
                    masked=bool(item.get("masked")),
                )
            )
        timeout = body.get("timeout_s")
        interval = body.get("heartbeat_interval_s")
        return cls(
            id=job_id,
            name=str(body.get("name") or ""),
            pipeline_id=body.get("pipeline_id")
            if isinstance(body.get("pipeline_id"), str)
            else None,
            attempt=body["attempt"] if isinstance(body.get("attempt"), int) else 1,
            is_async=bool(body.get("async")),
            script=tuple(script),
            timeout_s=_positive(timeout),
            token=token,
            heartbeat_interval_s=_positive(interval) or DEFAULT_HEARTBEAT_INTERVAL_S,
            variables=tuple(variables),
        )

    @property
    def masked_values(self) -> list[str]:
        return [v.value for v in self.variables if v.masked and v.value]

    def environment(self, parent: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
        """The script's environment (the parent's `INHERITED_ENV`, then the job's variables) and
        the names of variables that cannot be environment variables (left out)."""
        env = {k: parent[k] for k in INHERITED_ENV if k in parent}
        skipped = []
        for variable in self.variables:
            if VARIABLE_NAME.fullmatch(variable.key) and "\0" not in variable.value:
                env[variable.key] = variable.value
            else:
                skipped.append(variable.key)
        return env, skipped


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return float(value)


# --- the runner --------------------------------------------------------------------------------


class StopReason(StrEnum):
    CANCELED = "canceled"  # the gateway said so: kill, report nothing
    LOST = "lost"  # the gateway no longer lets us run it: kill, report nothing
    SHUTDOWN = "shutdown"  # the runner's grace period ran out: kill, report runner failure


class RunnerTokenRejected(Exception):
    """The gateway refused the runner token (revoked or wrong): the runner stops."""


@dataclass
class _JobRun:
    """The mutable state of one job this runner is executing."""

    job: JobPayload
    masker: Masker
    trace: TraceLog
    kill: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    wake_at: int = MAX_PATCH_BYTES
    stop_reason: StopReason | None = None
    script_running: bool = False
    finishing: bool = False
    trace_enabled: bool = True
    last_contact: float = field(default_factory=time.monotonic)

    @property
    def path(self) -> str:
        return f"/api/v1/runner/jobs/{self.job.id}"

    @property
    def gone(self) -> bool:
        return self.stop_reason in (StopReason.CANCELED, StopReason.LOST)

    def abort(self, reason: StopReason) -> None:
        """Stop the script (first reason wins)."""
        if self.stop_reason is None:
            self.stop_reason = reason
            log.info("job_aborted", extra={"job_id": self.job.id, "reason": str(reason)})
        self.kill.set()

    def output(self, chunk: bytes) -> None:
        self.trace.append(self.masker.feed(chunk))
        if self.trace.pending >= self.wake_at:
            self.wake.set()


class Runner:
    """Pulls jobs from a gateway and runs up to `concurrency` of them at once.

    `run()` returns once `stop()` was called and the running jobs are done (or, past
    `shutdown_grace_s`, killed and reported as `runner_system_failure`); a second `stop()` ends
    the grace period at once. It raises RunnerTokenRejected when the gateway refuses the runner
    token. Transport errors and 5xx answers never end it: it retries with capped, jittered
    exponential backoff.

    `tags` are informational: the gateway matches jobs against the tags the runner was
    registered with.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        tags: Sequence[str] = (),
        concurrency: int = 1,
        builds_dir: str | Path | None = None,
        poll_wait_s: int = DEFAULT_POLL_WAIT_S,
        shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S,
        kill_grace_s: float = DEFAULT_KILL_GRACE_S,
        trace_interval_s: float = TRACE_INTERVAL_S,
        max_patch_bytes: int = MAX_PATCH_BYTES,
        trace_limit_bytes: int = DEFAULT_TRACE_LIMIT_BYTES,
        backoff_cap_s: float = BACKOFF_CAP_S,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        parent_env: Mapping[str, str] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.url = url.rstrip("/")
        self._token = token
        self.tags = tuple(tags)
        self.concurrency = concurrency
        self._builds_dir = str(builds_dir) if builds_dir is not None else None
        self._poll_wait_s = poll_wait_s
        self._shutdown_grace_s = shutdown_grace_s
        self._kill_grace_s = kill_grace_s
        self._trace_interval_s = trace_interval_s
        self._max_patch_bytes = max_patch_bytes
        self._trace_limit_bytes = trace_limit_bytes
        self._backoff_cap_s = backoff_cap_s
        self._transport = transport
        self._rng = rng or random.Random()
        self._parent_env = dict(os.environ if parent_env is None else parent_env)
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._runs: dict[str, _JobRun] = {}
        self._http: httpx.AsyncClient | None = None
        self._token_rejected = False
        self._report_deadline: float | None = None

    @property
    def running_jobs(self) -> int:
        return len(self._tasks)

    def stop(self) -> None:
        """Stop taking jobs and let running ones finish; called again, kill them now."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.url,
            transport=self._transport,
            timeout=HTTP_TIMEOUT_S,
            headers={"User-Agent": f"gateway-runner/{__version__}"},
        ) as http:
            self._http = http
            log.info(
                "runner_started",
                extra={"url": self.url, "concurrency": self.concurrency, "tags": self.tags},
            )
            poller = asyncio.create_task(self._poll_loop())
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait({poller, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in (poller, stopping):
                task.cancel()
            await asyncio.gather(poller, stopping, return_exceptions=True)
            if poller.done() and not poller.cancelled() and poller.exception() is not None:
                log.error("poll_loop_failed", exc_info=poller.exception())
            await self._shutdown_jobs()
            self._http = None
        log.info("runner_stopped")
        if self._token_rejected:
            raise RunnerTokenRejected("the gateway refused the runner token")

    # -- polling --

    async def _poll_loop(self) -> None:
        backoff = self._backoff()
        while not self._stop.is_set():
            await self._slots.acquire()
            try:
                job = await self._request_job(backoff)
            except BaseException:
                self._slots.release()
                raise
            if job is None:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run_job(job))
            self._tasks.add(task)
            task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("job_task_failed", exc_info=task.exception())

    async def _request_job(self, backoff: Backoff) -> JobPayload | None:
        """One long poll: the job handed out, or None (nothing to do, or an error waited out)."""
        started = time.monotonic()
        try:
            response = await self._client.post(
                "/api/v1/runner/jobs/request",
                json={"wait_s": self._poll_wait_s},
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=self._poll_wait_s + HTTP_TIMEOUT_S,
            )
        except httpx.HTTPError as exc:
            delay = backoff.next_delay()
            log.warning(
                "gateway_unreachable",
                extra={"error": type(exc).__name__, "retry_in_s": round(delay, 2)},
            )
            await self._pause(delay)
            return None
        if response.status_code == 201:
            backoff.reset()
            try:
                return JobPayload.from_json(response.json())
            except ValueError as exc:
                log.error("job_unreadable", extra={"error": str(exc)})
                return None
        if response.status_code == 204:
            backoff.reset()
            # A gateway that answers at once must not make us spin.
            await self._pause(MIN_POLL_INTERVAL_S - (time.monotonic() - started))
            return None
        if response.status_code in (401, 403):
            log.error("runner_token_rejected", extra={"status": response.status_code})
            self._token_rejected = True
            self._stop.set()
            return None
        delay = backoff.next_delay()
        hint = retry_after_s(response.headers.get("Retry-After"))
        if hint is not None:
            delay = min(max(delay, hint), 2 * self._backoff_cap_s)
        log.warning(
            "job_request_failed",
            extra={"status": response.status_code, "retry_in_s": round(delay, 2)},
        )
        await self._pause(delay)
        return None

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if the runner is told to stop."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    # -- one job --

    async def _run_job(self, job: JobPayload) -> None:
        run = _JobRun(
            job=job,
            masker=Masker(job.masked_values),
            trace=TraceLog(self._trace_limit_bytes),
            wake_at=self._max_patch_bytes,
        )
        self._runs[job.id] = run
        try:
            if not await self._confirm(run):
                return
            log.info("job_started", extra={"job_id": job.id, "job_name": job.name})
            try:
                result = await self._execute(run)
            except OSError as exc:
                log.error("script_not_started", extra={"job_id": job.id, "error": str(exc)})
                run.trace.append(f"ERROR: the runner could not start the script: {exc}\n".encode())
                await self._finish(run, None)
                return
            if run.gone:
                log.info("job_abandoned", extra={"job_id": job.id, "reason": str(run.stop_reason)})
                return
            await self._finish(run, result)
        finally:
            del self._runs[job.id]

    async def _confirm(self, run: _JobRun) -> bool:
        """`PUT {"state": "running"}` until the gateway says yes (True) or no (False)."""
        backoff = self._backoff()
        deadline = time.monotonic() + CONFIRM_BUDGET_S
        while True:
            response = await self._job_call(run, "PUT", run.path, json={"state": "running"})
            if response is not None and response.status_code == 200:
                if response.headers.get("Job-Status", "running") not in ("running", ""):
                    log.info("job_dropped", extra={"job_id": run.job.id, "status": 200})
                    return False
                return True
            if response is not None and response.status_code not in RETRYABLE:
                log.info(
                    "job_dropped", extra={"job_id": run.job.id, "status": response.status_code}
                )
                return False
            if self._stop.is_set() or time.monotonic() >= deadline:
                log.warning("job_not_confirmed", extra={"job_id": run.job.id})
                return False
            await self._pause(backoff.next_delay())

    async def _execute(self, run: _JobRun) -> ScriptResult:
        env, skipped = run.job.environment(self._parent_env)
        for key in skipped:
            run.trace.append(
                f"WARNING: variable {key!r} is not a valid environment name\n".encode()
            )
        workdir = await asyncio.to_thread(
            tempfile.mkdtemp, prefix=f"gateway-job-{run.job.id}-", dir=self._builds_dir
        )
        syncing = asyncio.create_task(self._sync_loop(run))
        run.script_running = True
        try:
            result = await run_script(
                run.job.script,
                env=env,
                on_output=run.output,
                cwd=workdir,
                timeout_s=run.job.timeout_s,
                kill=run.kill,
                kill_grace_s=self._kill_grace_s,
            )
        finally:
            run.script_running = False
            syncing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await syncing
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        run.trace.append(run.masker.flush())
        return result

    async def _sync_loop(self, run: _JobRun) -> None:
        """While the script runs: send the trace at most `trace_interval_s` behind, and keep the
        job alive while the script is silent. Errors are waited out; cancel ends the loop."""
        backoff = self._backoff()
        # Each keepalive's answer carries Job-Status: ping often enough that a cancel reaches
        # a silent script within seconds, not only often enough to stay alive.
        keepalive_after = min(run.job.heartbeat_interval_s / 2, CANCEL_CHECK_S)
        while not run.kill.is_set():
            run.wake.clear()
            if run.trace.pending < self._max_patch_bytes:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.wake.wait(), timeout=self._trace_interval_s)
            if run.trace.pending and run.trace_enabled:
                progressed = await self._send_trace(run)
            elif time.monotonic() - run.last_contact >= keepalive_after:
                progressed = await self._keepalive(run)
            else:
                continue
            if progressed:
                backoff.reset()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.kill.wait(), timeout=backoff.next_delay())

    async def _keepalive(self, run: _JobRun) -> bool:
        response = await self._job_call(run, "PUT", run.path, json={"state": "running"})
        return response is not None and response.status_code not in RETRYABLE

    async def _send_trace(self, run: _JobRun) -> bool:
        """Send the next patch; False when it should be retried later."""
        patch = run.trace.next_patch(self._max_patch_bytes)
        if patch is None:
            return True
        response = await self._job_call(
            run,
            "PATCH",
            f"{run.path}/trace",
            content=patch.body,
            headers={"Content-Range": patch.content_range, "Content-Type": "text/plain"},
        )
        if response is None or response.status_code in RETRYABLE:
            return False
        size = parse_range_size(response.headers.get("Range"))
        if response.status_code == 202:
            run.trace.acknowledge(patch.end + 1 if size is None else size)
        elif response.status_code == 416:
            if size is None:
                return False
            log.info("trace_resumed", extra={"job_id": run.job.id, "offset": size})
            run.trace.acknowledge(size)
        elif response.status_code not in JOB_GONE:
            log.error("trace_refused", extra={"job_id": run.job.id, "status": response.status_code})
            run.trace_enabled = False
        return True

    async def _drain_trace(self, run: _JobRun, deadline: float) -> None:
        backoff = self._backoff()
        while run.trace.pending and run.trace_enabled and not run.gone:
            if await self._send_trace(run):
                backoff.reset()
                continue
            delay = backoff.next_delay()
            if time.monotonic() + delay >= deadline:
                log.warning("trace_incomplete", extra={"job_id": run.job.id})
                return
            await asyncio.sleep(delay)

    async def _finish(self, run: _JobRun, result: ScriptResult | None) -> None:
        """Send the rest of the trace, then report how the script ended."""
        run.finishing = True
        body: dict[str, Any]
        if result is None:
            body = {"state": "failed", "failure_reason": "runner_system_failure"}
        elif run.stop_reason is StopReason.SHUTDOWN and result.killed:
            run.trace.append(b"\nERROR: the runner shut down; the job's processes were killed\n")
            body = {"state": "failed", "failure_reason": "runner_system_failure"}
        elif result.timed_out:
            run.trace.append(
                f"\nERROR: the job exceeded its timeout of {run.job.timeout_s:g} s;"
                " its processes were killed\n".encode()
            )
            body = {"state": "failed", "failure_reason": "job_execution_timeout"}
        elif result.exit_code == 0:
            body = {"state": "success"}
        else:
            body = {"state": "failed", "failure_reason": "script_failure"}
        if result is not None:
            body["exit_code"] = result.exit_code
        deadline = time.monotonic() + REPORT_BUDGET_S
        if self._report_deadline is not None:
            deadline = min(deadline, self._report_deadline)
        await self._drain_trace(run, deadline)
        if run.gone:
            log.info("job_abandoned", extra={"job_id": run.job.id, "reason": str(run.stop_reason)})
            return
        backoff = self._backoff()
        while True:
            response = await self._job_call(run, "PUT", run.path, json=body, watch=False)
            if response is not None and response.status_code == 200:
                state = _json_field(response, "state")
                log.info(
                    "job_finished",
                    extra={
                        "job_id": run.job.id,
                        "state": state,
                        "exit_code": body.get("exit_code"),
                    },
                )
                return
            if response is not None and response.status_code not in RETRYABLE:
                log.warning(
                    "job_report_refused",
                    extra={"job_id": run.job.id, "status": response.status_code},
                )
                return
            delay = backoff.next_delay()
            if time.monotonic() + delay >= deadline:
                log.error("job_report_failed", extra={"job_id": run.job.id})
                return
            await asyncio.sleep(delay)

    async def _job_call(
        self, run: _JobRun, method: str, path: str, *, watch: bool = True, **kwargs: Any
    ) -> httpx.Response | None:
        """One job-token call; None on a transport error. With `watch`, a `Job-Status` other
        than `running`, or an answer saying the job is gone, aborts the script."""
        headers = {"Job-Token": run.job.token, **kwargs.pop("headers", {})}
        try:
            response = await self._client.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            log.warning(
                "gateway_unreachable", extra={"job_id": run.job.id, "error": type(exc).__name__}
            )
            return None
        if response.status_code < 300 or response.status_code == 416:
            run.last_contact = time.monotonic()
        if watch:
            status = response.headers.get("Job-Status", "")
            if status == "canceled":
                run.abort(StopReason.CANCELED)
            elif status not in ("", "running") or response.status_code in JOB_GONE:
                run.abort(StopReason.LOST)
        return response

    async def _shutdown_jobs(self) -> None:
        """Wait for running jobs up to the grace period, then kill and report what is left."""
        if not self._tasks:
            return
        log.info(
            "runner_draining", extra={"jobs": len(self._tasks), "grace_s": self._shutdown_grace_s}
        )
        forced = asyncio.create_task(self._force.wait())
        finished = asyncio.create_task(asyncio.wait(set(self._tasks)))
        await asyncio.wait(
            {forced, finished}, timeout=self._shutdown_grace_s, return_when=asyncio.FIRST_COMPLETED
        )
        forced.cancel()
        if self._tasks:
            log.warning("runner_killing_jobs", extra={"jobs": len(self._tasks)})
            budget = self._kill_grace_s + DRAIN_TIMEOUT_S + SHUTDOWN_REPORT_BUDGET_S
            self._report_deadline = time.monotonic() + budget
            for run in list(self._runs.values()):
                if not run.finishing:
                    run.abort(StopReason.SHUTDOWN)
            await asyncio.wait({finished}, timeout=budget + 1.0)
        finished.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("the runner is not running")
        return self._http

    def _backoff(self) -> Backoff:
        return Backoff(cap_s=self._backoff_cap_s, rng=self._rng)


def _json_field(response: httpx.Response, name: str) -> Any:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get(name) if isinstance(body, dict) else None


# --- command line ------------------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `gateway runner [options]` (run jobs) and `gateway runner register`."""
    runner = subparsers.add_parser(
        "runner",
        help="run script jobs (a shell executor); `runner register` creates a runner token",
        description="Pull script jobs from a gateway and run them with bash.",
    )
    runner.add_argument("--url", help=f"gateway address (GATEWAY_URL, {DEFAULT_URL})")
    runner.add_argument("--token", help="runner token (GATEWAY_RUNNER_TOKEN)")
    runner.add_argument("--tags", help="a,b: informational; jobs match the registered tags")
    runner.add_argument("--concurrency", type=int, default=1, help="jobs run at once (1)")
    runner.add_argument("--builds-dir", help="where job working directories go (temp dir)")
    runner.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=DEFAULT_SHUTDOWN_GRACE_S,
        help="on SIGTERM, how long running jobs may finish before they are killed",
    )
    runner.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    runner.set_defaults(run=_run_command)

    commands = runner.add_subparsers(title="runner commands")
    register = commands.add_parser("register", help="create a runner; prints its token once")
    register.add_argument("--url", help=f"gateway address (GATEWAY_URL, {DEFAULT_URL})")
    register.add_argument("--token", help="API token (GATEWAY_TOKEN, else the data dir's)")
    register.add_argument("--data-dir", help="where to find the admin token (GATEWAY_DATA_DIR)")
    register.add_argument("--description", default="")
    register.add_argument("--tags", help="a,b: the runner takes jobs whose tags it all has")
    register.add_argument(
        "--run-untagged",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also take jobs without tags (default: yes)",
    )
    register.set_defaults(run=_register_command)


def _tag_list(text: str | None) -> list[str]:
    return [tag.strip() for tag in (text or "").split(",") if tag.strip()]


def _run_command(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("GATEWAY_URL") or DEFAULT_URL
    token = args.token or os.environ.get("GATEWAY_RUNNER_TOKEN")
    if not token:
        print("gateway: no runner token: pass --token or set GATEWAY_RUNNER_TOKEN", file=sys.stderr)
        return 1
    if args.concurrency < 1:
        print("gateway: --concurrency must be at least 1", file=sys.stderr)
        return 1
    logs.configure(args.log_level)
    runner = Runner(
        url,
        token,
        tags=_tag_list(args.tags),
        concurrency=args.concurrency,
        builds_dir=args.builds_dir,
        shutdown_grace_s=args.shutdown_grace_s,
    )
    return asyncio.run(_serve(runner))


async def _serve(runner: Runner) -> int:
    loop = asyncio.get_running_loop()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(stop_signal, runner.stop)
    print(
        f"gateway runner {__version__} polling {runner.url} for jobs"
        f" (concurrency {runner.concurrency})",
        flush=True,
    )
    try:
        await runner.run()
    except RunnerTokenRejected as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    print("gateway runner stopped", flush=True)
    return 0


def _register_command(args: argparse.Namespace) -> int:
    url = gateway_url(args.url)
    try:
        token = api_token(args.token, args.data_dir)
    except MissingToken as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    body = {
        "description": args.description,
        "tags": _tag_list(args.tags),
        "run_untagged": args.run_untagged,
    }
    try:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT_S
        ) as client:
            response = client.post("/api/v1/runners", json=body)
    except httpx.HTTPError as exc:
        print(f"gateway: cannot reach the gateway: {exc}", file=sys.stderr)
        return 1
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if response.status_code != 201 or not isinstance(answer, dict):
        error = answer.get("error") if isinstance(answer, dict) else None
        detail = answer.get("detail") if isinstance(answer, dict) else None
        print(f"gateway: {response.status_code} {error}: {detail}", file=sys.stderr)
        return 1
    print(json.dumps({"id": answer.get("id"), "token": answer.get("token")}, indent=2))
    return 0
