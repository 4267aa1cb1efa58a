"""Fire and forget with state webhooks: a job's whole life pushed to a receiver, one webhook
dropped on purpose, and `GET /api/v1/jobs/{id}` as the way to catch up.

    GATEWAY_URL=http://127.0.0.1:8080 GATEWAY_TOKEN=... python demo.py [--wait-s 30]

1. Starts `examples/webhook_receiver.py` on a free loopback port with a fresh `whsec_` secret,
   told to answer 500 to the first `job.success` it gets.
2. `POST /api/v1/jobs` an external job with `state_webhook_url` pointing at the receiver and
   `state_webhook_secret`: the job id comes back at once; `job.pending` arrives.
3. Plays the external system that does the work, through the job's continue URL only: `start`
   (`job.running` arrives), a log line, a heartbeat, the completion uploaded as an artifact
   (skipped if this gateway has no artifact route), and the terminal call with outputs.
4. The receiver drops `job.success`, so it still believes the job is running.
   `GET /api/v1/jobs/{id}` tells the truth; the delivery log shows the 500.
5. The gateway retries the same event (same `webhook-id`) on its schedule
   (`GATEWAY_WEBHOOK_RETRY_SCHEDULE`, first retry after 5 s by default); the demo waits up to
   `--wait-s` for it.

The gateway must be allowed to call a loopback receiver: start it with
`GATEWAY_WEBHOOK_ALLOW_NETS=127.0.0.0/8`. Progress and the receiver's lines go to stderr; the
finished job, as GET returns it, to stdout. Needs httpx.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

RECEIVER = Path(__file__).resolve().parent.parent / "webhook_receiver.py"
EVENT_WAIT_S = 15.0
COMPLETION = {
    "model": "tiny-llm",
    "message": {"role": "assistant", "content": "The release adds state webhooks."},
    "done": True,
}


def say(text: str) -> None:
    print(f"==> {text}", file=sys.stderr, flush=True)


class Receiver:
    """The receiver subprocess; its stdout lines are echoed to stderr and kept for waiting."""

    def __init__(self, secret: str, drop_first: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(RECEIVER), "--port", "0", "--drop-first", drop_first],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "WEBHOOK_SECRET": secret},
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self.wait_for(r"^listening on http://", 10).split()[-1]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            print(f"   receiver | {line.rstrip()}", file=sys.stderr, flush=True)
            with self.changed:
                self.lines.append(line.rstrip())
                self.changed.notify_all()

    def wait_for(self, pattern: str, timeout_s: float) -> str:
        """The first line matching `pattern` (seen before or arriving within `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                found = next((line for line in self.lines if re.search(pattern, line)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"the receiver printed no line matching {pattern!r}")
                self.changed.wait(left)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def create_job(api: httpx.Client, receiver: Receiver, secret: str) -> dict[str, Any]:
    body = {
        "name": "chat-completion",
        "kind": "external",
        "callback_timeout_s": 600,
        "metadata": {"prompt": "Summarise the release notes"},
        "state_webhook_url": f"{receiver.url}/webhooks",
        "state_webhook_secret": secret,
    }
    response = api.post("/api/v1/jobs", json=body)
    if response.status_code == 422 and "state_webhook_url" in response.text:
        sys.exit(
            f"the gateway refused the receiver's address: {response.json()['detail']}\n"
            "start it with GATEWAY_WEBHOOK_ALLOW_NETS=127.0.0.0/8 to allow loopback receivers"
        )
    response.raise_for_status()
    job: dict[str, Any] = response.json()
    return job


def upload_artifact(http: httpx.Client, continue_url: str) -> bool:
    """The completion as artifact `completion.json`; False if this gateway has no such route."""
    response = http.put(
        f"{continue_url}/artifacts/completion.json",
        content=json.dumps(COMPLETION).encode(),
        headers={"content-type": "application/json"},
    )
    if response.status_code in (404, 405):
        say("this gateway has no artifact upload route; skipping the artifact")
        return False
    response.raise_for_status()
    say("uploaded the completion as artifact completion.json")
    return True


def work(http: httpx.Client, continue_url: str, receiver: Receiver, job_id: str) -> None:
    """What the external system does, holding only the continue URL."""
    http.post(f"{continue_url}/start").raise_for_status()
    receiver.wait_for(rf"^event job\.running job={job_id}", EVENT_WAIT_S)
    http.post(f"{continue_url}/log", content="generating 42 tokens\n").raise_for_status()
    http.post(f"{continue_url}/heartbeat").raise_for_status()
    upload_artifact(http, continue_url)
    body = {
        "status": "success",
        "message": "completion ready",
        "outputs": {"TOKENS": "42", "MODEL": COMPLETION["model"]},
        "result": {"finish_reason": "stop"},
    }
    http.post(continue_url, json=body).raise_for_status()
    say("the external system made the terminal call (success)")


def show_deliveries(api: httpx.Client, job_id: str) -> None:
    deliveries = api.get(f"/api/v1/jobs/{job_id}/deliveries").json()["items"]
    for delivery in reversed(deliveries):
        statuses = [a["status_code"] or a["error"] for a in delivery["attempts"]]
        say(
            f"  delivery {delivery['event_type']:<12} webhook-id={delivery['message_id']}"
            f" state={delivery['state']} attempts={statuses}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wait-s", type=float, default=30.0, help="how long to wait for the retry (30)"
    )
    args = parser.parse_args(argv)
    gateway_url = os.environ.get("GATEWAY_URL", "").rstrip("/")
    token = os.environ.get("GATEWAY_TOKEN")
    if not gateway_url or not token:
        sys.exit("set GATEWAY_URL (e.g. http://127.0.0.1:8080) and GATEWAY_TOKEN (an API token)")

    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    receiver = Receiver(secret, drop_first="job.success")
    auth = {"Authorization": f"Bearer {token}"}
    try:
        with (
            httpx.Client(base_url=gateway_url, headers=auth, timeout=30) as api,
            httpx.Client(timeout=30) as http,
        ):
            say(f"receiver listening on {receiver.url}; creating an external job")
            job = create_job(api, receiver, secret)
            job_id = job["id"]
            say(f"job {job_id} is {job['state']}; its state goes to the receiver from now on")
            receiver.wait_for(rf"^event job\.pending job={job_id}", EVENT_WAIT_S)

            work(http, job["continue_url"], receiver, job_id)
            receiver.wait_for(rf"^dropped job\.success job={job_id}", EVENT_WAIT_S)
            say("the receiver dropped job.success: as far as it knows, the job is still running")

            say(f"reconciling with GET /api/v1/jobs/{job_id}")
            job = api.get(f"/api/v1/jobs/{job_id}").json()
            artifacts = [a["name"] for a in job["artifacts"]]
            say(f"  state={job['state']} outputs={job['outputs']} artifacts={artifacts}")
            show_deliveries(api, job_id)

            say(f"waiting up to {args.wait_s:g} s for the gateway to retry job.success")
            started = time.monotonic()
            try:
                receiver.wait_for(rf"^event job\.success job={job_id}", args.wait_s)
                took = time.monotonic() - started
                say(f"the retry arrived after {took:.1f} s, same webhook-id: receiver caught up")
            except TimeoutError:
                say("no retry yet; the gateway keeps retrying, and GET already gave the outcome")
    finally:
        receiver.stop()
    print(json.dumps(job, indent=2))
    return 0 if job["state"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
