"""The `gateway` CLI, run as a real subprocess against a real `gateway serve`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SECRET_KEY, ServerProcess, start_server

pytestmark = pytest.mark.slow

ENV_ADMIN_TOKEN = "gw_env-admin-token-fedcba9876543210"


def gateway(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `python -m gateway ARGS` with no GATEWAY_* variables but those in `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=60,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module: every test makes its own jobs."""
    started = start_server(tmp_path_factory.mktemp("cli") / "data")
    yield started
    started.proc.kill()
    started.proc.wait(timeout=10)
    if started.proc.stdout:
        started.proc.stdout.close()


def auth(server: ServerProcess) -> tuple[str, ...]:
    return ("--url", server.url, "--token", server.token)


def create(server: ServerProcess, name: str = "deploy", *extra: str) -> dict[str, Any]:
    job: dict[str, Any] = json.loads(gateway("job", "create", name, *auth(server), *extra).stdout)
    return job


def fetch(server: ServerProcess, job_id: str) -> dict[str, Any]:
    with server.client() as http:
        job: dict[str, Any] = http.get(f"/api/v1/jobs/{job_id}").json()
    return job


def test_job_create_prints_the_job_with_its_continue_url(server: ServerProcess) -> None:
    """`job create NAME` prints the new external job as JSON, with a live continue URL."""
    job = create(server, "provision", "--callback-timeout-s", "600")
    assert job["name"] == "provision"
    assert job["kind"] == "external"
    assert job["state"] == "pending"
    assert job["continue_url"].startswith(f"{server.url}/continue/")
    state = httpx.get(job["continue_url"]).json()
    assert state["job_id"] == job["id"]
    assert state["state"] == "pending"


def test_client_commands_take_url_and_token_from_the_environment(server: ServerProcess) -> None:
    """GATEWAY_URL and GATEWAY_TOKEN stand in for --url and --token."""
    env = {"GATEWAY_URL": server.url, "GATEWAY_TOKEN": server.token}
    job = json.loads(gateway("job", "create", "from-env", env=env).stdout)
    shown = json.loads(gateway("job", "get", job["id"], env=env).stdout)
    assert shown["id"] == job["id"]
    assert "continue_url" not in shown


def test_client_commands_fall_back_to_the_data_dirs_admin_token(server: ServerProcess) -> None:
    """Without --token or GATEWAY_TOKEN, the admin token file in --data-dir is used."""
    done = gateway(
        "job", "create", "from-file", "--url", server.url, "--data-dir", str(server.data_dir)
    )
    assert json.loads(done.stdout)["name"] == "from-file"
    env = {"GATEWAY_URL": server.url, "GATEWAY_DATA_DIR": str(server.data_dir)}
    assert (
        json.loads(gateway("job", "create", "from-env-dir", env=env).stdout)["kind"] == "external"
    )


def test_client_commands_without_any_token_fail(server: ServerProcess, tmp_path: Path) -> None:
    """No token anywhere: a non-zero exit and a message naming the fix, not a traceback."""
    done = gateway("job", "list", "--url", server.url, "--data-dir", str(tmp_path), check=False)
    assert done.returncode == 1
    assert "no API token" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_wrong_token_is_reported_as_401(server: ServerProcess) -> None:
    """A token the server does not know exits 1 with the server's 401 on stderr."""
    done = gateway("job", "list", "--url", server.url, "--token", "gw_nope", check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("gateway: 401 ")


def test_job_get_and_list_show_the_created_job(server: ServerProcess) -> None:
    """`job get` prints the job as JSON; `job list` has a line with its id and state."""
    job = create(server, "listed")
    shown = json.loads(gateway("job", "get", job["id"], *auth(server)).stdout)
    assert shown["id"] == job["id"]
    assert shown["state"] == "pending"
    lines = gateway("job", "list", *auth(server)).stdout.splitlines()
    assert any(line.split() == [job["id"], "pending", "listed"] for line in lines), lines
    pending = gateway("job", "list", "--state", "success", *auth(server)).stdout
    assert job["id"] not in pending


def test_job_get_of_an_unknown_id_exits_non_zero(server: ServerProcess) -> None:
    """`job get` of an id that does not exist exits 1 with the 404 on stderr."""
    done = gateway("job", "get", "01HZZZZZZZZZZZZZZZZZZZZZZZ", *auth(server), check=False)
    assert done.returncode == 1
    assert "404" in done.stderr


def test_job_cancel_then_retry_gives_a_new_continue_url(server: ServerProcess) -> None:
    """`job cancel` cancels; a second cancel fails with 409; `job retry` prints the new
    attempt with a new continue URL, and the old URL is dead."""
    job = create(server, "flaky")
    canceled = json.loads(gateway("job", "cancel", job["id"], *auth(server)).stdout)
    assert canceled["state"] == "canceled"
    again = gateway("job", "cancel", job["id"], *auth(server), check=False)
    assert again.returncode == 1
    assert "409" in again.stderr

    retried = json.loads(gateway("job", "retry", job["id"], *auth(server)).stdout)
    assert retried["id"] != job["id"]
    assert retried["attempt"] == 2
    assert retried["retry_of"] == job["id"]
    assert retried["continue_url"] != job["continue_url"]
    gateway("continue", retried["continue_url"])
    assert fetch(server, retried["id"])["state"] == "success"
    old = gateway("continue", job["continue_url"], check=False)
    assert old.returncode == 1
    assert "409 already_final" in old.stderr


def test_continue_with_outputs_finishes_the_job(server: ServerProcess) -> None:
    """`continue URL --output K=V --message M` exits 0 and the job is success with them."""
    job = create(server)
    done = gateway("continue", job["continue_url"], "--output", "IP=10.0.0.1", "--message", "done")
    assert json.loads(done.stdout) == {"job_id": job["id"], "state": "success"}
    finished = fetch(server, job["id"])
    assert finished["state"] == "success"
    assert finished["outputs"] == {"IP": "10.0.0.1"}
    assert finished["message"] == "done"


def test_continue_failed_with_exit_code_fails_the_job(server: ServerProcess) -> None:
    """`continue URL --failed --exit-code 3` fails the job with `callback_failure`."""
    job = create(server)
    done = gateway("continue", job["continue_url"], "--failed", "--exit-code", "3")
    assert json.loads(done.stdout)["state"] == "failed"
    failed = fetch(server, job["id"])
    assert failed["failure_reason"] == "callback_failure"
    assert failed["exit_code"] == 3


def test_continue_twice_with_the_same_idempotency_key_succeeds_twice(
    server: ServerProcess,
) -> None:
    """A repeated `continue` with the same --idempotency-key is replayed: both exit 0, and
    the job ended once, with the first call's outputs."""
    job = create(server)
    first = gateway("continue", job["continue_url"], "--idempotency-key", "k1", "--output", "A=1")
    second = gateway("continue", job["continue_url"], "--idempotency-key", "k1", "--output", "A=2")
    assert first.stdout == second.stdout
    assert fetch(server, job["id"])["outputs"] == {"A": "1"}
    with server.client() as http:
        events = http.get(f"/api/v1/jobs/{job['id']}/events").json()["items"]
    assert [event["state"] for event in events] == ["pending", "success"]


def test_continue_on_a_finished_job_with_another_body_exits_non_zero(
    server: ServerProcess,
) -> None:
    """A different call on a finished job exits 1 and prints the 409 `already_final`."""
    job = create(server)
    gateway("continue", job["continue_url"], "--message", "first")
    late = gateway("continue", job["continue_url"], "--failed", check=False)
    assert late.returncode == 1
    assert late.stdout == ""
    assert late.stderr.startswith("gateway: 409 already_final:")
    assert fetch(server, job["id"])["state"] == "success"


def test_continue_with_a_bad_url_exits_non_zero(server: ServerProcess) -> None:
    """A forged continue token answers 404 and `continue` exits 1; so do a bad --output and a
    URL that is not http(s), at once (no retries) and without echoing the URL."""
    forged = gateway("continue", f"{server.url}/continue/not-a-token", check=False)
    assert forged.returncode == 1
    assert "404" in forged.stderr
    job = create(server)
    malformed = gateway("continue", job["continue_url"], "--output", "novalue", check=False)
    assert malformed.returncode == 1
    assert "KEY=VALUE" in malformed.stderr
    for bad in ("not a url", "ftp://example.com/continue/x", "http://"):
        refused = gateway("continue", bad, check=False)
        assert refused.returncode == 1
        assert refused.stderr == "gateway: the continue URL must be an http:// or https:// URL\n"
    assert fetch(server, job["id"])["state"] == "pending"


def test_serve_uses_gateway_admin_token_from_the_environment(tmp_path: Path) -> None:
    """With GATEWAY_ADMIN_TOKEN set, `serve` says the token comes from it, writes no token
    file, and accepts that token."""
    data_dir = tmp_path / "data"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "GATEWAY_ADMIN_TOKEN": ENV_ADMIN_TOKEN,
        "GATEWAY_SECRET_KEY": SECRET_KEY,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not any(line.startswith("admin token") for line in lines):
            line = proc.stdout.readline()
            assert line, "serve exited early:\n" + "".join(lines)
            lines.append(line)
        url = re.search(r"listening on (http://\S+)", "".join(lines))
        assert url is not None, lines
        assert lines[-1] == "admin token: GATEWAY_ADMIN_TOKEN\n"
        assert ENV_ADMIN_TOKEN not in "".join(lines)
        give_up = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url.group(1)}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < give_up, "serve never became ready"
            time.sleep(0.05)  # polling with a deadline
        assert not (data_dir / "admin-token").exists()
        listed = gateway("job", "list", "--url", url.group(1), "--token", ENV_ADMIN_TOKEN)
        assert listed.returncode == 0
        refused = gateway("job", "list", "--url", url.group(1), "--token", "gw_other", check=False)
        assert refused.returncode == 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
        if proc.stdout:
            proc.stdout.close()
