"""The reference runner as a real process against a real `gateway serve`: killed with -9 mid-job,
a cancel reaching a running script, and SIGTERM while a job runs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess, start_server
from tests.processes import job_processes, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc"),
]

HEARTBEAT_TIMEOUT_S = 2
DEADLINE_S = 15.0


def kill_job_processes(job_id: str) -> None:
    for pid in job_processes(job_id):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module, impatient with silent runners and sweeping often; each test
    isolates its jobs with a runner tag of its own."""
    started = start_server(
        tmp_path_factory.mktemp("runner-process") / "data",
        "--sweep-interval-s",
        "0.2",
        env={"GATEWAY_RUNNER_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)},
    )
    yield started
    started.proc.kill()
    started.proc.wait(timeout=10)
    if started.proc.stdout:
        started.proc.stdout.close()


class RunnerProcess:
    """A registered `gateway runner` subprocess with a tag of its own; its log in a file."""

    def __init__(
        self, server: ServerProcess, log: Path, *extra: str, tag: str | None = None
    ) -> None:
        self.server = server
        self.tag = tag or f"t-{uuid.uuid4().hex[:12]}"
        with server.client() as http:
            answer = http.post("/api/v1/runners", json={"tags": [self.tag], "run_untagged": False})
        assert answer.status_code == 201, answer.text
        self.id: str = answer.json()["id"]
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["GATEWAY_RUNNER_TOKEN"] = answer.json()["token"]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "runner", "--url", server.url, *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def create_job(self, *script: str, **fields: Any) -> str:
        body = {"name": "work", "kind": "script", "script": list(script), "tags": [self.tag]}
        with self.server.client() as http:
            answer = http.post("/api/v1/jobs", json={**body, **fields})
        assert answer.status_code == 201, answer.text
        job_id: str = answer.json()["id"]
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        with self.server.client() as http:
            job: dict[str, Any] = http.get(f"/api/v1/jobs/{job_id}").json()
        return job

    def trace(self, job_id: str) -> str:
        with self.server.client() as http:
            return http.get(f"/api/v1/jobs/{job_id}/trace").text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def start_runner(server: ServerProcess, tmp_path: Path) -> Iterator[Callable[..., RunnerProcess]]:
    started: list[RunnerProcess] = []

    def start(*extra: str, tag: str | None = None) -> RunnerProcess:
        runner = RunnerProcess(server, tmp_path / f"runner-{len(started)}.log", *extra, tag=tag)
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.stop()


def running_script(runner: RunnerProcess, job_id: str) -> list[int]:
    """Wait until the job runs and its script has printed `started`; the script's processes."""
    wait_for(lambda: "started" in runner.trace(job_id), "the script to start")
    assert runner.job(job_id)["state"] == "running"
    return wait_for(lambda: job_processes(job_id), "the script's processes")


def test_a_runner_killed_mid_job_fails_the_job_with_runner_system_failure(
    start_runner: Callable[..., RunnerProcess],
) -> None:
    """After the runner dies with SIGKILL, its running job fails `runner_system_failure` once
    GATEWAY_RUNNER_HEARTBEAT_TIMEOUT_S has passed without a word from it."""
    runner = start_runner()
    job_id = runner.create_job("echo started", "sleep 60")
    try:
        running_script(runner, job_id)
        runner.proc.send_signal(signal.SIGKILL)
        runner.proc.wait(timeout=10)
        killed_at = time.monotonic()
        failed = wait_for(
            lambda: (job := runner.job(job_id))["state"] != "running" and job,
            "the job to fail",
            timeout_s=HEARTBEAT_TIMEOUT_S + 8,
        )
    finally:
        kill_job_processes(job_id)  # the runner died: nobody else reaps its script
    assert failed["state"] == "failed"
    assert failed["failure_reason"] == "runner_system_failure"
    # Not before the runner could have pinged last (it pings every second here).
    assert time.monotonic() - killed_at >= HEARTBEAT_TIMEOUT_S - 1.5


def test_a_cancel_reaches_a_running_script(start_runner: Callable[..., RunnerProcess]) -> None:
    """Canceling a job whose script is in `sleep 60` kills the script's process group within
    seconds, and the job stays canceled (the runner reports nothing over it)."""
    runner = start_runner()
    job_id = runner.create_job("echo started", "sleep 60")
    try:
        running_script(runner, job_id)
        with runner.server.client() as http:
            answer = http.post(f"/api/v1/jobs/{job_id}/cancel")
        assert answer.status_code == 200, answer.text
        wait_for(lambda: not job_processes(job_id), "the script to be killed", timeout_s=8)
        wait_for(
            lambda: f"job_abandoned job_id={job_id}" in runner.log.read_text(),
            "the runner to drop the job",
        )
    finally:
        kill_job_processes(job_id)
    job = runner.job(job_id)
    assert job["state"] == "canceled"
    assert job["failure_reason"] is None
    with runner.server.client() as http:
        events = http.get(f"/api/v1/jobs/{job_id}/events").json()["items"]
    assert events[-1]["state"] == "canceled"
    assert runner.proc.poll() is None  # the runner goes on


def test_sigterm_lets_a_running_job_finish_within_the_grace_period(
    start_runner: Callable[..., RunnerProcess], tmp_path: Path
) -> None:
    """On SIGTERM the runner takes no new job, lets the running one finish (success), then
    exits 0."""
    runner = start_runner("--shutdown-grace-s", "15")
    flag = tmp_path / "go"
    job_id = runner.create_job(
        "echo started",
        'while [ ! -e "$FLAG" ]; do sleep 0.05; done',
        "echo finished",
        variables={"FLAG": str(flag)},
    )
    running_script(runner, job_id)
    runner.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "runner_draining" in runner.log.read_text(), "the runner to drain")
    later_job = runner.create_job("echo should not run")
    assert runner.proc.poll() is None
    flag.touch()
    assert runner.proc.wait(timeout=DEADLINE_S) == 0, runner.log.read_text()
    job = runner.job(job_id)
    assert job["state"] == "success"
    assert job["exit_code"] == 0
    assert "finished" in runner.trace(job_id)
    assert runner.job(later_job)["state"] == "pending"


def test_sigterm_past_the_grace_period_kills_the_script_and_fails_the_job(
    start_runner: Callable[..., RunnerProcess],
) -> None:
    """A job still running when the shutdown grace period ends is killed and reported failed
    `runner_system_failure`; the runner exits 0 and leaves no script process behind."""
    runner = start_runner("--shutdown-grace-s", "0.5")
    job_id = runner.create_job("echo started", "sleep 60")
    try:
        running_script(runner, job_id)
        runner.proc.send_signal(signal.SIGTERM)
        assert runner.proc.wait(timeout=DEADLINE_S) == 0, runner.log.read_text()
        leftovers = job_processes(job_id)
    finally:
        kill_job_processes(job_id)
    assert leftovers == []
    job = runner.job(job_id)
    assert job["state"] == "failed"
    assert job["failure_reason"] == "runner_system_failure"
    assert "the runner shut down" in runner.trace(job_id)


def test_a_job_created_after_a_runner_stops_goes_to_the_next_runner_at_once(
    start_runner: Callable[..., RunnerProcess],
) -> None:
    """The long poll of a runner that stopped claims nothing: a job created just after goes to
    the next runner at once, not after GATEWAY_CONFIRM_TIMEOUT_S (60 s). (Regression: the
    abandoned poll, woken by the new job, handed it to nobody.)"""
    first = start_runner()

    def polling() -> bool:
        with first.server.client() as http:
            runners = http.get("/api/v1/runners", params={"limit": 500}).json()["items"]
        return any(r["id"] == first.id and r["last_seen_at"] for r in runners)

    wait_for(polling, "the first runner to poll")
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=DEADLINE_S) == 0
    job_id = first.create_job("echo ran")
    second = start_runner(tag=first.tag)
    done = wait_for(
        lambda: (job := second.job(job_id))["state"] not in ("pending", "running") and job,
        "the second runner to run the job",
        timeout_s=10,
    )
    assert done["state"] == "success"
    assert done["runner_id"] == second.id
