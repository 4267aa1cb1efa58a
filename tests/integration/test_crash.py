"""A real `gateway serve` killed with SIGKILL or stopped with SIGTERM loses nothing it answered."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

JOBS = 200
KILL_AFTER_OK = 60
TERMINAL = {"success", "failed", "canceled", "skipped"}


def _create_jobs(http: httpx.Client, count: int, **fields: Any) -> list[dict[str, Any]]:
    jobs = []
    for n in range(count):
        response = http.post("/api/v1/jobs", json={"name": f"job-{n}", **fields})
        assert response.status_code == 201, response.text
        jobs.append(response.json())
    return jobs


def _callback_body(n: int) -> dict[str, Any]:
    return {"message": f"done {n}", "outputs": {"N": str(n), "HOST": f"node-{n}"}}


def _terminal_events(http: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    response = http.get(f"/api/v1/jobs/{job_id}/events", params={"limit": 500})
    assert response.status_code == 200, response.text
    return [event for event in response.json()["items"] if event["state"] in TERMINAL]


def _wait_for_wall_clock(moment: float, limit_s: float = 30) -> None:
    """Block until the wall clock reads past `moment` (the thing waited for is time itself)."""
    give_up = time.monotonic() + limit_s
    while time.time() <= moment:
        assert time.monotonic() < give_up, "the wall clock never reached the deadline"
        threading.Event().wait(min(0.05, max(0.0, moment - time.time()) + 0.01))


def _parse_rfc3339(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_sigkill_under_callback_load_keeps_every_answered_callback(server_factory: Any) -> None:
    """Every callback answered 200 before a SIGKILL survives it, each job ends at most once,
    and a callback cut off by the crash can be re-sent after restart (applied or replayed)."""
    server = server_factory()
    with server.client() as admin:
        jobs = _create_jobs(admin, JOBS)

    outcomes: dict[int, int | str] = {}
    ok_count = 0
    lock = threading.Lock()
    enough_ok = threading.Event()

    def fire(http: httpx.Client, n: int) -> None:
        nonlocal ok_count
        try:
            response = http.post(
                jobs[n]["continue_url"],
                json=_callback_body(n),
                headers={"Idempotency-Key": f"key-{n}"},
            )
        except httpx.TransportError as exc:
            outcome: int | str = type(exc).__name__
        else:
            outcome = response.status_code
        with lock:
            outcomes[n] = outcome
            if outcome == 200:
                ok_count += 1
                if ok_count >= KILL_AFTER_OK:
                    enough_ok.set()

    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    with (
        httpx.Client(timeout=10, limits=limits) as http,
        ThreadPoolExecutor(max_workers=8) as pool,
    ):
        futures = [pool.submit(fire, http, n) for n in range(JOBS)]
        assert enough_ok.wait(timeout=60), f"too few callbacks answered: {outcomes}"
        server.kill9()
        for future in futures:
            future.result()

    answered = {n for n, outcome in outcomes.items() if outcome == 200}
    cut_off = {n for n, outcome in outcomes.items() if isinstance(outcome, str)}
    assert answered | cut_off == set(range(JOBS)), f"unexpected answers: {outcomes}"
    assert len(answered) >= KILL_AFTER_OK
    assert cut_off, "the server was killed after every callback had been answered"

    restarted = server_factory()
    with restarted.client() as admin:
        for n in sorted(answered):
            job = admin.get(f"/api/v1/jobs/{jobs[n]['id']}").json()
            assert job["state"] == "success", job
            assert job["outputs"] == _callback_body(n)["outputs"]
            assert job["message"] == f"done {n}"
            assert len(_terminal_events(admin, job["id"])) == 1

        for n in range(JOBS):
            assert len(_terminal_events(admin, jobs[n]["id"])) <= 1

        for n in sorted(cut_off):
            url = jobs[n]["continue_url"].replace(server.url, restarted.url)
            again = admin.post(url, json=_callback_body(n), headers={"Idempotency-Key": f"key-{n}"})
            assert again.status_code == 200, (n, again.text)
            assert again.json() == {"job_id": jobs[n]["id"], "state": "success"}

        for n in range(JOBS):
            job = admin.get(f"/api/v1/jobs/{jobs[n]['id']}").json()
            assert job["state"] == "success", job
            assert job["outputs"] == _callback_body(n)["outputs"]
            assert len(_terminal_events(admin, job["id"])) == 1


def test_deadline_passed_while_down_fires_right_after_start(server_factory: Any) -> None:
    """A callback deadline that passed while the server was dead fails the job (once, with
    `callback_timeout`) within a couple of seconds of the next start."""
    server = server_factory("--sweep-interval-s", "0.2")
    with server.client() as admin:
        job = _create_jobs(admin, 1, callback_timeout_s=1)[0]
    server.kill9()
    deadline = _parse_rfc3339(job["deadline_at"])
    _wait_for_wall_clock(deadline + 0.05)

    restarted = server_factory("--sweep-interval-s", "0.2")
    with restarted.client() as admin:
        give_up = time.monotonic() + 2
        while True:
            seen = admin.get(f"/api/v1/jobs/{job['id']}").json()
            if seen["state"] != "pending" or time.monotonic() > give_up:
                break
            threading.Event().wait(0.05)  # polling with a deadline
        assert seen["state"] == "failed", seen
        assert seen["failure_reason"] == "callback_timeout"
        assert seen["deadline_at"] is None
        events = _terminal_events(admin, job["id"])
        assert [(e["state"], e["failure_reason"]) for e in events] == [
            ("failed", "callback_timeout")
        ]
        late = admin.post(job["continue_url"].replace(server.url, restarted.url), json={})
        assert late.status_code == 409
        assert late.json()["failure_reason"] == "callback_timeout"


def test_sigterm_exits_zero_and_restart_sees_all_data(server_factory: Any) -> None:
    """SIGTERM stops the server with exit code 0, and a restart on the same data dir serves
    every job as it was, with the pending job's continue URL still working."""
    server = server_factory()
    with server.client() as admin:
        finished, pending, canceled = _create_jobs(admin, 3)
        assert admin.post(finished["continue_url"], json=_callback_body(1)).status_code == 200
        assert admin.post(f"/api/v1/jobs/{canceled['id']}/cancel").status_code == 200
        before = {
            j["id"]: admin.get(f"/api/v1/jobs/{j['id']}").json()
            for j in (finished, pending, canceled)
        }
    assert server.terminate() == 0
    assert "gateway stopped\n" in server.proc.stdout.read()

    restarted = server_factory()
    with restarted.client() as admin:
        listed = admin.get("/api/v1/jobs").json()["items"]
        assert {job["id"] for job in listed} == set(before)
        for job_id, job in before.items():
            assert admin.get(f"/api/v1/jobs/{job_id}").json() == job
        url = pending["continue_url"].replace(server.url, restarted.url)
        assert admin.post(url, json={"outputs": {"A": "1"}}).status_code == 200
        assert admin.get(f"/api/v1/jobs/{pending['id']}").json()["outputs"] == {"A": "1"}
