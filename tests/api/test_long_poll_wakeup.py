"""A long poll is not blind between its look at the queue and its wait: a job made pending
while the look is still in flight (it found nothing) wakes the poll at once, not at the
long poll's periodic re-check (PRODUCT.md "Runner API": no busy loop, the waiting request
wakes when a job becomes pending)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.api.runner import LONG_POLL_RECHECK_S
from gateway.models import HandOut

WAIT_S = 2  # below the re-check, so a missed wake-up shows as a wait of the whole wait_s


async def test_a_job_made_pending_during_the_look_at_the_queue_wakes_the_poll(
    app: Starlette, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert WAIT_S < LONG_POLL_RECHECK_S
    runner = (await client.post("/api/v1/runners", json={})).json()
    store = app.state.ctx.store
    look = store.claim_job
    made: list[httpx.Response] = []

    async def look_then_make_a_job(*args: Any, **kwargs: Any) -> HandOut | None:
        """The first look finds nothing; a job is created before that look returns."""
        handout: HandOut | None = await look(*args, **kwargs)
        if handout is None and not made:
            made.append(
                await client.post(
                    "/api/v1/jobs", json={"name": "build", "kind": "script", "script": ["true"]}
                )
            )
        return handout

    monkeypatch.setattr(store, "claim_job", look_then_make_a_job)
    started = time.monotonic()
    answer = await client.post(
        "/api/v1/runner/jobs/request",
        json={"wait_s": WAIT_S},
        headers={"Authorization": f"Bearer {runner['token']}"},
    )
    waited = time.monotonic() - started
    assert made and made[0].status_code == 201, made
    assert answer.status_code == 201 and answer.json()["id"] == made[0].json()["id"]
    assert waited < 1.0, f"the poll slept through the wake-up ({waited:.2f} s)"
