"""`examples/async_job/demo.py` against a real `gateway serve`, and
`examples/webhook_receiver.py` on its own against requests signed by the gateway's signer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from gateway.webhooks import signing

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RECEIVER_LINE = re.compile(r"^ {3}receiver \| (.*)$")
LIFECYCLE_LINE = re.compile(r"^(event|dropped) (\S+) job=(\S+) .*sequence=(\d+)")


def test_demo_delivers_the_lifecycle_drops_one_webhook_and_reconciles(server_factory: Any) -> None:
    """The receiver verifies and prints pending, running, the dropped success and its retry (with
    the completion artifact inline) in that order, one webhook-id per event; GET
    /api/v1/jobs/{id} agrees with the last event."""
    server = server_factory(
        env={
            "GATEWAY_WEBHOOK_ALLOW_NETS": "127.0.0.0/8",
            "GATEWAY_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2,0.2",
        }
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {"GATEWAY_URL": server.url, "GATEWAY_TOKEN": server.token}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "async_job" / "demo.py"), "--wait-s", "20"],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    job_id = printed["id"]
    received = [m.group(1) for line in done.stderr.splitlines() if (m := RECEIVER_LINE.match(line))]
    assert not [line for line in received if line.startswith(("rejected", "late", "duplicate"))]
    lifecycle = [
        (m[1], m[2], m[3], int(m[4])) for line in received if (m := LIFECYCLE_LINE.match(line))
    ]
    assert lifecycle == [
        ("event", "job.pending", job_id, 1),
        ("event", "job.running", job_id, 2),
        ("dropped", "job.success", job_id, 3),
        ("event", "job.success", job_id, 3),
    ]
    assert "receiver caught up" in done.stderr
    success_line = received[-1]
    assert f"webhook-id=job_{job_id}_3" in success_line

    with server.client() as http:
        job = http.get(f"/api/v1/jobs/{job_id}").json()
        deliveries = http.get(f"/api/v1/jobs/{job_id}/deliveries").json()["items"]
    assert job["state"] == printed["state"] == "success"
    assert job["outputs"] == {"TOKENS": "42", "MODEL": "tiny-llm"}
    assert job["message"] == "completion ready"
    by_type = {d["event_type"]: d for d in deliveries}
    assert sorted(by_type) == ["job.pending", "job.running", "job.success"]
    assert all(d["state"] == "succeeded" for d in deliveries)
    assert [a["status_code"] for a in by_type["job.success"]["attempts"]] == [500, 200]
    assert by_type["job.success"]["message_id"] == f"job_{job_id}_3"
    assert "uploaded the completion as artifact completion.json" in done.stderr
    assert [a["name"] for a in job["artifacts"]] == ["completion.json"]
    assert re.search(r" artifact=completion\.json\(\d+ bytes, inline\)$", success_line)


# --------------------------------------------------------------------------------------------
# The receiver alone
# --------------------------------------------------------------------------------------------

SECRET = signing.new_secret()


class Receiver:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url

    def send(
        self,
        body: bytes,
        *,
        message_id: str = "job_01J0000000000000000000000A_1",
        timestamp: int | None = None,
        secrets: tuple[str, ...] = (SECRET,),
        signature: str | None = None,
    ) -> tuple[int, str]:
        """POST a signed request; return the status and the line the receiver printed."""
        at = int(time.time()) if timestamp is None else timestamp
        headers = signing.headers(secrets, message_id, at, body)
        if signature is not None:
            headers["webhook-signature"] = signature
        status = httpx.post(self.url, content=body, headers=headers, timeout=10).status_code
        assert self.proc.stdout is not None
        return status, self.proc.stdout.readline().strip()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver_args = ["--port", "0", "--drop-first", "job.failed"]
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "webhook_receiver.py"), *receiver_args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "WEBHOOK_SECRET": SECRET},
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("listening on http://"), first
    try:
        yield Receiver(proc, first.split()[-1])
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


def event(event_type: str, sequence: int, job_id: str = "01J0000000000000000000000A") -> bytes:
    state = event_type.split(".")[1]
    data = {"id": job_id, "state": state, "sequence": sequence, "artifacts": []}
    return json.dumps(
        {"type": event_type, "timestamp": "2025-01-01T00:00:00Z", "data": data}
    ).encode()


def test_receiver_accepts_a_signed_event_once_and_dedupes_by_webhook_id(
    receiver: Receiver,
) -> None:
    """An event signed by the independent `standardwebhooks` package is printed and answered
    200; the same webhook-id again is a duplicate, answered 200 without being handled twice."""
    body = event("job.running", 2)
    now = int(time.time())
    message_id = "job_01J0000000000000000000000A_1"
    signature = Webhook(SECRET).sign(message_id, datetime.fromtimestamp(now, UTC), body.decode())
    status, line = receiver.send(body, timestamp=now, signature=signature)
    assert status == 200
    assert line.startswith("event job.running job=01J0000000000000000000000A state=running")
    assert receiver.send(body) == (
        200,
        "duplicate webhook-id=job_01J0000000000000000000000A_1 (already handled; answered 200)",
    )


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("wrong_secret", "no signature matches"),
        ("tampered_body", "no signature matches"),
        ("old_timestamp", "webhook-timestamp is more than 5 minutes away"),
        ("future_timestamp", "webhook-timestamp is more than 5 minutes away"),
        ("no_signature", "missing webhook-id"),
        ("v1a_only", "no signature matches"),
    ],
)
def test_receiver_rejects_what_the_gateway_did_not_sign_just_now(
    receiver: Receiver, case: str, why: str
) -> None:
    """Bad signatures, tampered bodies, timestamps over 5 minutes away and missing headers
    get 401 and are not handled."""
    body = event("job.success", 3)
    now = int(time.time())
    message_id = "job_01J0000000000000000000000A_1"
    if case == "wrong_secret":
        sent = receiver.send(body, secrets=(signing.new_secret(),))
    elif case == "tampered_body":
        tampered = signing.signature([SECRET], message_id, now, body + b" ")
        sent = receiver.send(body, timestamp=now, signature=tampered)
    elif case == "old_timestamp":
        sent = receiver.send(body, timestamp=now - 301)
    elif case == "future_timestamp":
        sent = receiver.send(body, timestamp=now + 301)
    elif case == "no_signature":
        sent = receiver.send(body, signature="")
    else:
        valid = signing.signature([SECRET], message_id, now, body)
        sent = receiver.send(body, timestamp=now, signature=valid.replace("v1,", "v1a,"))
    assert sent[0] == 401
    assert sent[1].startswith(f"rejected: {why}")
    # Rejected requests leave no trace: the real event is still handled as new.
    status, line = receiver.send(body)
    assert (status, line.split()[0]) == (200, "event")


def test_receiver_accepts_any_signature_while_a_secret_rotates(receiver: Receiver) -> None:
    """With `v1,<new> v1,<old>` the receiver that knows only the old secret still verifies."""
    body = event("job.pending", 1)
    status, line = receiver.send(body, secrets=(signing.new_secret(), SECRET))
    assert status == 200
    assert line.startswith("event job.pending")


def test_receiver_drops_the_first_delivery_of_a_type_then_applies_only_newer_events(
    receiver: Receiver,
) -> None:
    """`--drop-first job.failed` answers 500 once, the retry is handled; an event whose
    sequence is older than one already applied is acknowledged but marked late."""
    failed = event("job.failed", 3)
    running = event("job.running", 2)
    first = receiver.send(failed, message_id="job_01J0000000000000000000000A_3")
    assert first[0] == 500
    assert first[1].startswith("dropped job.failed")
    retry = receiver.send(failed, message_id="job_01J0000000000000000000000A_3")
    assert retry[0] == 200
    assert retry[1].startswith("event job.failed")
    late = receiver.send(running, message_id="job_01J0000000000000000000000A_2")
    assert late[0] == 200
    assert late[1].startswith("late job.running")
    assert late[1].endswith("(sequence 3 already applied)")


def test_receiver_refuses_to_start_without_a_secret() -> None:
    """No --secret and no $WEBHOOK_SECRET: a usage error, not a receiver that accepts all."""
    env = {k: v for k, v in os.environ.items() if k != "WEBHOOK_SECRET"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "webhook_receiver.py"), "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 2
    assert "WEBHOOK_SECRET" in done.stderr
