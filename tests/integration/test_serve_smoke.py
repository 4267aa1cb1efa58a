"""A real `gateway serve` process starts, answers, and stops cleanly on SIGTERM."""

from __future__ import annotations

from typing import Any


def test_serve_starts_answers_and_stops_on_sigterm(server_factory: Any) -> None:
    server = server_factory()
    with server.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/api/v1/jobs").status_code == 200
    assert server.terminate() == 0
