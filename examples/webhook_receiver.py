"""A small receiver of the gateway's state webhooks, standard library only.

It verifies every request the way the Standard Webhooks spec says (the recipe is spelled out in
`verify` below with nothing but hmac, hashlib and base64), refuses a bad signature or a
timestamp more than 5 minutes away, prints each event, de-duplicates by `webhook-id` and
answers 2xx to what it handled, so the gateway stops retrying it.

    WEBHOOK_SECRET=whsec_... python webhook_receiver.py --port 9000

`--drop-first TYPE` (repeatable) answers 500 to the first delivery of that event type, to
watch the gateway retry it. In real code, the `standardwebhooks` package does the same
verification: `Webhook(secret).verify(body, headers)`.

What it prints, one line per request, on stdout:

    listening on http://127.0.0.1:9000
    event job.pending job=01J... state=pending sequence=1 webhook-id=job_01J..._1
    dropped job.success job=01J... sequence=3 webhook-id=job_01J..._3 (answered 500 on purpose)
    duplicate webhook-id=job_01J..._1 (already handled; answered 200)
    late job.running job=01J... sequence=2 webhook-id=... (sequence 3 already applied)
    rejected: no signature matches (answered 401)
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOLERANCE_S = 5 * 60
REMEMBERED_IDS = 10_000
MAX_BODY_BYTES = 8 * 1024 * 1024


class Rejected(Exception):
    """A request that does not come from the gateway (or was replayed); never handled."""


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_...` secret: the bytes its base64 part encodes."""
    return base64.b64decode(secret.removeprefix("whsec_"), validate=True)


def verify(key: bytes, headers: Any, body: bytes, now: float) -> str:
    """Check one request; return its `webhook-id`, or raise Rejected.

    1. The three headers are there and the timestamp is an integer.
    2. The timestamp is within 5 minutes of our clock (a replayed old request fails here).
    3. HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{raw body}` with the key, base64,
       equals one of the `v1,<base64>` entries of `webhook-signature` (several, space-separated,
       while a secret rotates), compared in constant time.
    """
    message_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not message_id or not timestamp or not signatures:
        raise Rejected("missing webhook-id, webhook-timestamp or webhook-signature")
    if not timestamp.isascii() or not timestamp.isdigit():
        raise Rejected("webhook-timestamp is not an integer")
    if abs(now - int(timestamp)) > TOLERANCE_S:
        raise Rejected("webhook-timestamp is more than 5 minutes away")
    signed = f"{message_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for entry in signatures.split(" "):
        version, _, value = entry.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return message_id
    raise Rejected("no signature matches")


class Receiver:
    """What has been handled: webhook-ids (bounded), the highest sequence applied per owner,
    and the event types still to drop once."""

    def __init__(self, key: bytes, drop_first: list[str]) -> None:
        self.key = key
        self.to_drop = set(drop_first)
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.applied: dict[str, int] = {}
        self.lock = threading.Lock()

    def handle(self, message_id: str, body: bytes) -> tuple[int, str]:
        """Handle one verified request; return the status to answer and the line to print."""
        event = json.loads(body)
        kind, data = event["type"], event["data"]
        owner = f"{kind.split('.')[0]}={data['id']}"
        where = f"{owner} sequence={data['sequence']} webhook-id={message_id}"
        with self.lock:
            if message_id in self.seen:
                return 200, f"duplicate webhook-id={message_id} (already handled; answered 200)"
            if kind in self.to_drop:
                self.to_drop.discard(kind)
                return 500, f"dropped {kind} {where} (answered 500 on purpose)"
            self.seen[message_id] = None
            if len(self.seen) > REMEMBERED_IDS:
                self.seen.popitem(last=False)
            # Deliveries may overtake each other: apply an event only if it is newer.
            latest = self.applied.get(owner, 0)
            if data["sequence"] < latest:
                return 200, f"late {kind} {where} (sequence {latest} already applied)"
            self.applied[owner] = data["sequence"]
        line = f"event {kind} {owner} state={data['state']} sequence={data['sequence']}"
        line += f" webhook-id={message_id}"
        for artifact in data.get("artifacts") or []:
            inline = "inline" if "content_base64" in artifact else "by url"
            line += f" artifact={artifact['name']}({artifact['size']} bytes, {inline})"
        return 200, line


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:
            self.answer(413, "rejected: body too large (answered 413)")
            return
        body = self.rfile.read(length)
        try:
            message_id = verify(self.server.receiver.key, self.headers, body, time.time())
        except Rejected as exc:
            self.answer(401, f"rejected: {exc} (answered 401)")
            return
        status, line = self.server.receiver.handle(message_id, body)
        self.answer(status, line)

    def answer(self, status: int, line: str) -> None:
        """Answer, then print: whoever watches the lines may stop us once one is out."""
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()
        print(line, flush=True)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: `answer` prints one line per request."""


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], receiver: Receiver) -> None:
        super().__init__(address, Handler)
        self.receiver = receiver


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--secret", help="the whsec_ secret (default: $WEBHOOK_SECRET)")
    parser.add_argument(
        "--drop-first",
        action="append",
        default=[],
        metavar="TYPE",
        help="answer 500 to the first delivery of this event type (e.g. job.success)",
    )
    args = parser.parse_args(argv)
    secret = args.secret or os.environ.get("WEBHOOK_SECRET")
    if not secret:
        parser.error("give the webhook secret with --secret or $WEBHOOK_SECRET")
    try:
        key = secret_key(secret)
    except binascii.Error:
        parser.error("the secret is whsec_ followed by base64")
    server = Server((args.host, args.port), Receiver(key, args.drop_first))
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
