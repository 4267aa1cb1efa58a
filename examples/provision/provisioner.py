"""A stand-in for an external provisioning service (think bare-metal or cloud VMs).

A CI job asks it for a machine with `POST /requests {"callback": "<continue URL>"}` and exits
at once; the service answers 202 and works in the background. Through the callback URL alone
(no API token, no job id) it marks the work started, streams log lines, heartbeats while it
waits, and finally reports the machine's address as outputs, which the jobs that `need` this
one receive as variables:

    POST {callback}/start                 the work began
    POST {callback}/log        text       appended to the job's trace
    POST {callback}/heartbeat             still alive
    POST {callback}  {"outputs": {"IP": ..., "NODE": ...}}   done

Standard library only. The port comes from `--port` or `PROVISIONER_PORT` (default 8765; 0
picks a free one); the first line printed says where it listens. `--delay-s` (or
`PROVISION_DELAY_S`, default 5) is how long a "machine" takes.

    python provisioner.py --port 8765 --delay-s 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_PORT = 8765
DEFAULT_DELAY_S = 5.0
HEARTBEAT_EVERY_S = 1.0
NOT_PARKED_PATIENCE_S = 60.0
HTTP_TIMEOUT_S = 10.0


def say(message: str) -> None:
    """Log to stderr. Never the callback URL: it is a credential."""
    print(f"provisioner: {message}", file=sys.stderr, flush=True)


class CallbackError(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error


def call(url: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
    """POST to the callback URL; its JSON answer, or CallbackError with the status."""
    request = urllib.request.Request(url, data=body or b"", method="POST")
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError):
            error = ""
        raise CallbackError(exc.code, error) from None


def wait_until_parked(callback: str) -> None:
    """`start` until the gateway takes it. The CI job hands the URL over and then exits; until
    its runner has reported that exit the job is not parked yet and the URL answers 409, so
    the first calls may have to be repeated."""
    deadline = time.monotonic() + NOT_PARKED_PATIENCE_S
    while True:
        try:
            call(f"{callback}/start")
            return
        except CallbackError as exc:
            if exc.status != HTTPStatus.CONFLICT or exc.error == "already_final":
                raise
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def log(callback: str, line: str) -> None:
    call(f"{callback}/log", f"{line}\n".encode(), content_type="text/plain")


def provision(request_id: int, callback: str, delay_s: float) -> None:
    """The background work for one request."""
    ip, hostname = f"10.0.0.{10 + request_id}", f"node-{request_id}"
    try:
        wait_until_parked(callback)
        say(f"request {request_id}: started")
        log(callback, f"provisioner: request {request_id} accepted, allocating {hostname}")
        log(callback, f"provisioner: powering on {hostname}, installing the OS")
        finish_at = time.monotonic() + delay_s
        while (left := finish_at - time.monotonic()) > 0:
            call(f"{callback}/heartbeat")
            time.sleep(min(HEARTBEAT_EVERY_S, left))
        log(callback, f"provisioner: {hostname} is up at {ip}")
        body = {"message": f"{hostname} ready", "outputs": {"IP": ip, "NODE": hostname}}
        answer = call(callback, json.dumps(body).encode())
        say(f"request {request_id}: done, job is {answer.get('state')}")
    except (CallbackError, OSError) as exc:
        say(f"request {request_id}: giving up: {exc}")


class Handler(BaseHTTPRequestHandler):
    server_version = "provisioner/1"
    ids = itertools.count(1)
    delay_s = DEFAULT_DELAY_S

    def do_POST(self) -> None:
        if self.path != "/requests":
            self.answer(HTTPStatus.NOT_FOUND, {"error": "not_found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            callback = json.loads(self.rfile.read(length))["callback"]
        except (ValueError, KeyError, TypeError):
            callback = None
        if not isinstance(callback, str) or not callback.startswith(("http://", "https://")):
            self.answer(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": "`callback` must be a URL"})
            return
        request_id = next(self.ids)
        threading.Thread(
            target=provision, args=(request_id, callback, self.delay_s), daemon=True
        ).start()
        say(f"request {request_id}: accepted")
        self.answer(HTTPStatus.ACCEPTED, {"request_id": request_id, "state": "accepted"})

    def answer(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # `say` reports what matters; the default access log is noise here


def main() -> None:
    parser = argparse.ArgumentParser(description="A stand-in provisioning service.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("PROVISIONER_PORT", DEFAULT_PORT))
    )
    parser.add_argument(
        "--delay-s", type=float, default=float(os.environ.get("PROVISION_DELAY_S", DEFAULT_DELAY_S))
    )
    args = parser.parse_args()
    Handler.delay_s = args.delay_s
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    host, port = server.server_address[:2]
    print(f"provisioner listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
