"""`gateway pipeline run` as a real subprocess against a real `gateway serve`, with external jobs
only (no runner needed): what it prints, and its exit code when a pipeline does not succeed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, start_server

pytestmark = pytest.mark.slow

DEADLINE_S = 20.0
PIPELINE = """\
name: approvals
approve:
  external: true
  callback_timeout: 10m
ship:
  needs: [approve]
  external: true
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    started = start_server(tmp_path_factory.mktemp("pipeline-cli") / "data")
    yield started
    started.proc.kill()
    started.proc.wait(timeout=10)
    if started.proc.stdout:
        started.proc.stdout.close()


def run_pipeline(
    server: ServerProcess, path: Path, *extra: str, log: Path
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_TOKEN"] = server.token
    args = [sys.executable, "-m", "gateway", "pipeline", "run", str(path), "--url", server.url]
    with log.open("wb") as out:
        return subprocess.Popen([*args, *extra], stdout=out, stderr=subprocess.STDOUT, env=env)


def continue_urls(log: Path) -> dict[str, str]:
    return dict(re.findall(r"^continue URL of (\S+): (\S+)$", log.read_text(), re.M))


def test_without_follow_it_prints_the_pipeline_and_the_continue_urls(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Without --follow it prints the new pipeline's id and each external job's continue URL,
    and exits 0 at once."""
    path = tmp_path / "approvals.yml"
    path.write_text(PIPELINE)
    log = tmp_path / "out.log"
    assert run_pipeline(server, path, log=log).wait(timeout=DEADLINE_S) == 0
    pipeline_id = re.search(
        r"^pipeline (\S+) created: approvals \(2 jobs\)$", log.read_text(), re.M
    )
    assert pipeline_id is not None, log.read_text()
    urls = continue_urls(log)
    assert set(urls) == {"approve", "ship"}
    with server.client() as http:
        view = http.get(f"/api/v1/pipelines/{pipeline_id.group(1)}").json()
    assert view["state"] == "waiting"  # only parked jobs, or jobs behind them
    assert httpx.get(urls["approve"]).json()["state"] == "pending"


def test_follow_exits_1_when_the_pipeline_fails(server: ServerProcess, tmp_path: Path) -> None:
    """--follow prints a line per change and exits 1 when the pipeline ends `failed` (the
    external system reported a failure; the downstream job is skipped)."""
    path = tmp_path / "approvals.yml"
    path.write_text(PIPELINE)
    log = tmp_path / "follow.log"
    proc = run_pipeline(server, path, "--follow", log=log)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while "approve" not in (urls := continue_urls(log)):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # polling with a deadline, not synchronisation by sleep
        answer = httpx.post(urls["approve"], json={"status": "failed", "message": "denied"})
        assert answer.status_code == 200, answer.text
        code = proc.wait(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 1, text
    assert "job approve: failed [callback_failure]" in text
    assert "job ship: skipped" in text
    assert re.search(r"^pipeline \S+ ended failed", text, re.M)
