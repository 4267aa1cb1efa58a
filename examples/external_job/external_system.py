"""A stand-in for an external system (a bare-metal provisioner) that finishes a CI job.

It is given one thing: the job's continue URL. No API token, no job id. Through that URL it
marks the job started, appends to the job's trace, heartbeats while it works, and finally
reports the result with outputs that downstream jobs receive as variables.

    python external_system.py CONTINUE_URL
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

import httpx


def provision() -> dict[str, str]:
    """Pretend to provision a machine; return what the CI pipeline needs to know."""
    return {"IP": "10.0.0.7", "HOSTNAME": "node-7"}


def finish(http: httpx.Client, continue_url: str, body: dict[str, Any]) -> httpx.Response:
    """The terminal call, re-sent on a transport error with the same Idempotency-Key: if the
    first reply was lost, the gateway answers the repeat with that reply, not a 409."""
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    for _ in range(2):
        try:
            return http.post(continue_url, json=body, headers=headers)
        except httpx.TransportError:
            pass
    return http.post(continue_url, json=body, headers=headers)


def main(continue_url: str) -> None:
    with httpx.Client(timeout=30) as http:
        http.post(f"{continue_url}/start").raise_for_status()
        # Provisioners tend to echo their callback URL; the gateway masks the token in traces.
        log = f"provisioner: request accepted, will call back {continue_url}\n"
        http.post(f"{continue_url}/log", content=log).raise_for_status()
        outputs = provision()
        http.post(f"{continue_url}/heartbeat").raise_for_status()
        log = f"provisioner: node {outputs['HOSTNAME']} is up at {outputs['IP']}\n"
        http.post(f"{continue_url}/log", content=log).raise_for_status()
        body = {"status": "success", "message": "provisioned", "outputs": outputs}
        response = finish(http, continue_url, body)
        response.raise_for_status()
        print(f"external system: job {response.json()['job_id']} finished", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: external_system.py CONTINUE_URL")
    main(sys.argv[1])
