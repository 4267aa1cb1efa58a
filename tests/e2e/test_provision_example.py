"""`examples/provision/`, run for real: `gateway serve`, a registered `gateway runner`, the
provisioner service and `gateway pipeline run ... --follow`, each a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.processes import job_processes, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc"),
]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "provision"
DEADLINE_S = 20.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return {**env, **extra}


def gateway(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


class Processes:
    """Subprocesses started by a test, stopped (SIGTERM, then SIGKILL) at its end."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._started: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, args: list[str], env: dict[str, str]
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start `args` with stdout and stderr in a log file; the process and the file."""
        log = self._tmp_path / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        self._started.append(proc)
        return proc, log

    def stop_all(self) -> None:
        for proc in self._started:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop_all()


class CallbackSpy:
    """Stands between the job and the provisioner: records each request body (the continue
    URL the provisioner got) and forwards it unchanged."""

    def __init__(self, target: str) -> None:
        self.bodies: list[dict[str, Any]] = []
        spy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                spy.bodies.append(json.loads(raw))
                answer = httpx.post(
                    f"{target}{self.path}",
                    content=raw,
                    headers={"Content-Type": "application/json"},
                    timeout=10,
                )
                self.send_response(answer.status_code)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def register_runner(server: ServerProcess) -> str:
    done = subprocess.run(
        gateway("runner", "register", "--url", server.url, "--token", server.token),
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    token: str = json.loads(done.stdout)["token"]
    return token


def start_provisioner(processes: Processes, delay_s: float) -> str:
    _, log = processes.start(
        "provisioner",
        [sys.executable, str(EXAMPLE / "provisioner.py"), "--port", "0", "--delay-s", str(delay_s)],
        clean_env(),
    )
    match = wait_for(
        lambda: re.search(r"listening on (http://\S+)", log.read_text()), "the provisioner"
    )
    return match.group(1)


def test_provision_example_resumes_the_pipeline_with_the_provisioners_outputs(
    server_factory: Any, processes: Processes
) -> None:
    """The pipeline ends in success (exit 0), the outputs reach deploy's trace, the runner is
    free while provision waits, and the continue token is in no trace."""
    server: ServerProcess = server_factory()
    runner_token = register_runner(server)
    processes.start(
        "runner", gateway("runner", "--url", server.url, "--token", runner_token), clean_env()
    )
    spy = CallbackSpy(start_provisioner(processes, delay_s=3))
    try:
        follow, follow_log = processes.start(
            "follow",
            gateway(
                "pipeline",
                "run",
                str(EXAMPLE / "pipeline.yml"),
                "--follow",
                "--url",
                server.url,
                "--token",
                server.token,
                "--var",
                f"PROVISIONER_URL={spy.url}",
            ),
            clean_env(),
        )
        pipeline_id = wait_for(
            lambda: re.search(r"^pipeline (\S+) created", follow_log.read_text(), re.M),
            "the pipeline to be created",
        ).group(1)

        with server.client() as http:

            def jobs() -> dict[str, dict[str, Any]]:
                view = http.get(f"/api/v1/pipelines/{pipeline_id}").json()
                return {job["name"]: job for job in view["jobs"]}

            parked = wait_for(
                lambda: (job := jobs()["provision"])["state"] == "waiting" and job,
                "provision to park",
            )
            # Parked: the script is gone and the runner holds nothing for it.
            assert parked["parked_at"] is not None
            assert job_processes(parked["id"]) == []
            runners = http.get("/api/v1/runners").json()["items"]
            assert all(parked["id"] not in r["running_job_ids"] for r in runners)

            # The one runner (concurrency 1) takes other work while provision waits.
            side = http.post(
                "/api/v1/jobs",
                json={"name": "side", "kind": "script", "script": ["echo side job ran"]},
            ).json()
            wait_for(
                lambda: http.get(f"/api/v1/jobs/{side['id']}").json()["state"] == "success",
                "the side job to run",
            )
            assert jobs()["provision"]["state"] == "waiting"

            exit_code = follow.wait(timeout=DEADLINE_S)
            final = jobs()
            traces = {
                name: http.get(f"/api/v1/jobs/{job['id']}/trace").text
                for name, job in final.items()
            }
            traces["side"] = http.get(f"/api/v1/jobs/{side['id']}/trace").text
            view = http.get(f"/api/v1/pipelines/{pipeline_id}").json()
    finally:
        spy.close()

    assert exit_code == 0, follow_log.read_text()
    assert view["state"] == "success"
    assert {name: job["state"] for name, job in final.items()} == {
        "build": "success",
        "provision": "success",
        "deploy": "success",
    }
    outputs = final["provision"]["outputs"]
    assert re.fullmatch(r"10\.0\.0\.\d+", outputs["IP"])
    assert f"deploying to {outputs['IP']} ({outputs['NODE']})" in traces["deploy"]
    assert "side job ran" in traces["side"]

    followed = follow_log.read_text()
    assert "job provision: waiting" in followed
    assert f"pipeline {pipeline_id} ended success" in followed

    [request] = spy.bodies
    continue_url = request["callback"]
    token = continue_url.rsplit("/continue/", 1)[1]
    assert len(token) > 20
    for name, trace in traces.items():
        assert token not in trace, name
        assert re.findall(r"/continue/\S*", trace) == [], name
    assert "it will call back [MASKED]" in traces["provision"]
    assert "provisioner: node-1 is up at 10.0.0.11" in traces["provision"]


def test_run_sh_runs_the_whole_example(tmp_path: Path) -> None:
    """`examples/provision/run.sh` starts everything itself and exits 0 with deploy's trace
    showing the provisioned address and provision's showing the URL masked."""
    bin_dir = str(Path(sys.executable).parent)
    env = clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHON=sys.executable,
        PROVISION_DELAY_S="1",
        TMPDIR=str(tmp_path),
    )
    done = subprocess.run(
        ["bash", str(EXAMPLE / "run.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^deploying to 10\.0\.0\.\d+ \(node-1\)$", done.stdout, re.M)
    assert "it will call back [MASKED]" in done.stdout
    assert re.findall(r"/continue/\S*", done.stdout) == []
    assert re.search(r"pipeline \S+ ended success", done.stdout)
