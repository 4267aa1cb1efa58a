"""The runnable examples in `examples/` work against a real `gateway serve`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_external_job_example_finishes_the_job_through_its_continue_url(
    server_factory: Any,
) -> None:
    """`examples/external_job/run.sh` ends with the job in success with the provisioner's
    outputs, and the trace holds its log lines with the continue token masked."""
    server = server_factory()
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHON": sys.executable,
        "GATEWAY_URL": server.url,
        "GATEWAY_TOKEN": server.token,
    }
    done = subprocess.run(
        ["bash", str(EXAMPLES / "external_job" / "run.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["state"] == "success"
    assert printed["outputs"] == {"IP": "10.0.0.7", "HOSTNAME": "node-7"}

    with server.client() as http:
        job = http.get(f"/api/v1/jobs/{printed['id']}").json()
        trace = http.get(f"/api/v1/jobs/{printed['id']}/trace").text
        events = http.get(f"/api/v1/jobs/{printed['id']}/events").json()["items"]
    assert job["state"] == "success"
    assert job["message"] == "provisioned"
    assert job["outputs"] == {"IP": "10.0.0.7", "HOSTNAME": "node-7"}
    assert [event["state"] for event in events] == ["pending", "running", "success"]
    assert trace.splitlines() == [
        f"provisioner: request accepted, will call back {server.url}/continue/[MASKED]",
        "provisioner: node node-7 is up at 10.0.0.7",
    ]
    assert re.findall(r"/continue/\S*", trace) == ["/continue/[MASKED]"]
