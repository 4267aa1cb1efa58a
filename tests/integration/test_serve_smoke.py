"""A real `gateway serve` process starts, answers, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def test_serve_starts_answers_and_stops_on_sigterm(server_factory: Any) -> None:
    server = server_factory()
    with server.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/api/v1/jobs").status_code == 200
    assert server.terminate() == 0


def test_serve_with_another_secret_key_refuses_in_one_line(
    server_factory: Any, tmp_path: Path
) -> None:
    """A data dir used with one GATEWAY_SECRET_KEY: a start with another exits 1 with one line
    naming the variable, no traceback, and never says it listens."""
    assert server_factory().terminate() == 0
    env = {**os.environ, "GATEWAY_SECRET_KEY": "another-secret-key-0123456789abcdef"}
    command = [sys.executable, "-m", "gateway", "serve", "--port", "0"]
    refused = subprocess.run(
        [*command, "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "gateway: GATEWAY_SECRET_KEY differs" in refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout
    assert "listening on" not in refused.stdout
