"""The live event stream against a real `gateway serve`: an event arriving while a client
listens reaches it without polling."""

from __future__ import annotations

import threading
from typing import Any

import httpx

from tests.api.test_stream import parse


def test_a_listening_client_gets_a_callback_live(server_factory: Any) -> None:
    """Against a real server: a client listening from now receives job.success as the callback
    lands, without polling."""
    server = server_factory()
    with server.client() as http:
        job = http.post("/api/v1/jobs", json={"name": "live"}).json()
        received: list[dict[str, Any]] = []
        listening = threading.Event()

        def listen() -> None:
            with http.stream("GET", "/api/v1/events/stream", timeout=15) as response:
                listening.set()
                buffer = ""
                for chunk in response.iter_text():
                    buffer += chunk
                    complete = buffer[: buffer.rfind("\n\n") + 2]
                    frames = parse(complete)
                    if any(f["event"] == "job.success" for f in frames):
                        received.extend(frames)
                        return

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        assert listening.wait(10)
        assert httpx.post(job["continue_url"], json={}, timeout=10).status_code == 200
        thread.join(timeout=15)
    assert not thread.is_alive()
    assert any(
        f["event"] == "job.success" and f["data"]["data"]["id"] == job["id"] for f in received
    )
