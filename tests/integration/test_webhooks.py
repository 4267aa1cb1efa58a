"""State webhooks delivered to real receivers on loopback (uvicorn in a thread, see
`tests/receivers.py`): the wire format and signatures, retries, slow and failing receivers,
410, redelivery, rotation, racing callbacks, the private-address guard at connect time, and a
`gateway serve` killed with SIGKILL while deliveries are pending.

The app runs in process on the system clock (webhook timestamps must be near real time for
`standardwebhooks` to verify them) with its dispatcher on and the sweeper off.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.config import Settings
from gateway.models import EndpointSpec
from gateway.webhooks.client import WebhookClient
from gateway.webhooks.guard import BlockedAddress, parse_networks
from tests.conftest import ADMIN_TOKEN, BASE_URL, SECRET_KEY, api_client, continue_path
from tests.receivers import Received, Receiver, Reply, poll_until

SERVER_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"server-webhook-secret-for-tests!").decode()
JOB_SECRET = "whsec_" + base64.b64encode(b"a-job-s-own-state-webhook-secret").decode()
LOOPBACK = "127.0.0.0/8"
TERMINAL_TYPES = {"job.success", "job.failed", "job.canceled", "job.skipped"}

GatewayFactory = Callable[..., Awaitable[httpx.AsyncClient]]


class Receivers:
    """Starts receivers on demand and remembers them, to release or stop them all."""

    def __init__(self) -> None:
        self.started: list[Receiver] = []

    def __call__(self, default: Reply | None = None) -> Receiver:
        receiver = Receiver(default).start()
        self.started.append(receiver)
        return receiver

    def release_all(self) -> None:
        for receiver in self.started:
            receiver.release()


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    """Start receivers on demand; every one is stopped at the end."""
    started = Receivers()
    yield started
    for receiver in started.started:
        receiver.stop()


def gateway_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Loopback allowed, a known server webhook secret, a tiny retry schedule; keyword
    arguments override any setting."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "admin_token": ADMIN_TOKEN,
        "secret_key": SECRET_KEY,
        "public_url": BASE_URL,
        "webhook_secret": SERVER_WEBHOOK_SECRET,
        "webhook_allow_nets": LOOPBACK,
        "webhook_retry_schedule": "0.05,0.05,0.05",
        **overrides,
    }
    return Settings(**values)


@contextlib.asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """The app's lifespan (store, dispatcher) and an admin client of it."""
    async with app.router.lifespan_context(app), api_client(app) as client:
        yield client


@pytest.fixture
async def start_gateway(tmp_path: Path, receivers: Receivers) -> AsyncIterator[GatewayFactory]:
    """Start the app with `gateway_settings(**overrides)`, its dispatcher on, and return an
    admin client; at the end receivers' hangs are released first, so shutting down never
    waits for one."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> httpx.AsyncClient:
            settings = gateway_settings(tmp_path, **overrides)
            app = create_app(settings, run_sweeper=False, run_dispatcher=True)
            return await stack.enter_async_context(running(app))

        try:
            yield start
        finally:
            receivers.release_all()


# --- helpers ----------------------------------------------------------------------------------


async def subscribe(client: httpx.AsyncClient, url: str, **fields: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/webhooks", json={"url": url, **fields})
    assert response.status_code == 201, response.text
    endpoint: dict[str, Any] = response.json()
    return endpoint


async def new_job(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/jobs", json={"name": "deploy", **fields})
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


async def get_json(client: httpx.AsyncClient, path: str) -> Any:
    response = await client.get(path, params={"limit": 500} if "deliveries" in path else None)
    assert response.status_code == 200, response.text
    return response.json()


async def job_deliveries(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await get_json(client, f"/api/v1/jobs/{job_id}/deliveries"))[
        "items"
    ]
    return items


async def endpoint_deliveries(client: httpx.AsyncClient, endpoint_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (
        await get_json(client, f"/api/v1/webhooks/{endpoint_id}/deliveries")
    )["items"]
    return items


async def job_events(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await get_json(client, f"/api/v1/jobs/{job_id}/events"))["items"]
    return sorted(items, key=lambda e: e["sequence"])


def hand_signature(secret: str, request: Received) -> str:
    """`v1,<base64>` computed here with hmac, independently of the gateway's signing code."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{request.webhook_id}.{request.headers['webhook-timestamp']}.".encode()
    digest = hmac.new(key, signed + request.body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def assert_signed(request: Received, secret: str) -> Any:
    """The request verifies with `secret` under `standardwebhooks` and by hand; its payload."""
    assert hand_signature(secret, request) in request.headers["webhook-signature"].split(" ")
    return standardwebhooks.Webhook(secret).verify(request.body, dict(request.headers))


def assert_not_signed(request: Received, secret: str) -> None:
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(request.body, dict(request.headers))


def by_sequence(requests: list[Received]) -> list[dict[str, Any]]:
    """The bodies of delivered events (deduplicated by webhook-id), ordered by sequence."""
    unique = {r.webhook_id: r.json() for r in requests if r.ok}
    return sorted(unique.values(), key=lambda body: int(body["data"]["sequence"]))


def epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def without_event_fields(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("previous_state", "sequence")}


def delivered_to(receiver: Receiver, path: str, owner_id: str) -> list[Received]:
    return [
        r for r in receiver.received if r.ok and r.path == path and f"_{owner_id}_" in r.webhook_id
    ]


# --- the wire format --------------------------------------------------------------------------


async def test_external_job_lifecycle_arrives_in_order_signed_and_shaped(
    start_gateway: GatewayFactory, receivers: Receivers
) -> None:
    """An external job's pending, running and success events reach an explicit subscription
    and the job's own state_webhook_url in order, as {type, timestamp, data} with data = the job
    as GET shows it + previous_state + sequence, webhook-id job_<id>_<seq>, signed per
    Standard Webhooks with each endpoint's secret."""
    hook = receivers()
    client = await start_gateway()
    endpoint = await subscribe(client, hook.url("/all"))
    job = await new_job(client, state_webhook_url=hook.url("/own"), state_webhook_secret=JOB_SECRET)
    token_path = continue_path(job)

    def count(n: int) -> Callable[[list[Received]], bool]:
        return lambda got: all(len([r for r in got if r.ok and r.path == p]) >= n for p in paths)

    paths = ("/all", "/own")
    await hook.wait_for(count(1))
    assert (await client.post(f"{token_path}/start")).status_code == 200
    await hook.wait_for(count(2))
    response = await client.post(token_path, json={"message": "synced", "result": {"rev": 7}})
    assert response.status_code == 200, response.text
    await hook.wait_for(count(3))

    final = await get_json(client, f"/api/v1/jobs/{job['id']}")
    events = await job_events(client, job["id"])
    assert [e["state"] for e in events] == ["pending", "running", "success"]
    for path, secret, other in (
        ("/all", endpoint["secret"], JOB_SECRET),
        ("/own", JOB_SECRET, endpoint["secret"]),
    ):
        requests = [r for r in hook.received if r.path == path]
        assert len(requests) == 3, "one request per event, no retries"
        bodies = [r.json() for r in requests]  # arrival order: each waited for before the next
        assert [b["type"] for b in bodies] == ["job.pending", "job.running", "job.success"]
        assert [b["data"]["previous_state"] for b in bodies] == [None, "pending", "running"]
        assert [b["data"]["sequence"] for b in bodies] == [1, 2, 3]
        assert [b["timestamp"] for b in bodies] == [e["at"] for e in events]
        for request, body, event in zip(requests, bodies, events, strict=True):
            assert set(body) == {"type", "timestamp", "data"}
            assert request.webhook_id == f"job_{job['id']}_{event['sequence']}"
            assert "." not in request.webhook_id
            assert request.headers["content-type"] == "application/json"
            assert abs(request.timestamp - request.wall) <= 2, "signed at the attempt"
            assert assert_signed(request, secret) == body
            assert_not_signed(request, other)
            assert body["data"]["state"] == event["state"]
            assert body["data"]["id"] == job["id"]
            assert "continue_url" not in body["data"]
            assert token_path.removeprefix("/continue/") not in request.body.decode()
        assert without_event_fields(bodies[-1]["data"]) == final
        assert bodies[0]["data"]["started_at"] is None
        assert bodies[1]["data"]["started_at"] == final["started_at"]
    log = await poll_until(
        lambda: endpoint_deliveries(client, endpoint["id"]),
        lambda items: {d["state"] for d in items} == {"succeeded"},
        what="every attempt recorded",
    )
    assert sorted(d["message_id"] for d in log) == sorted(f"job_{job['id']}_{n}" for n in (1, 2, 3))
    assert all(len(d["attempts"]) == 1 for d in log)
    assert {d["endpoint_id"] for d in await job_deliveries(client, job["id"])} >= {endpoint["id"]}


async def test_pipeline_delivers_every_job_event_and_its_own_events(
    start_gateway: GatewayFactory, receivers: Receivers
) -> None:
    """A pipeline's state_webhook_url (no secret of its own: signed with the server's webhook
    secret) gets every event of every job and of the pipeline, ending with pipeline.success
    whose data is the pipeline as GET shows it; a subscription limited to that pipeline gets
    none of another pipeline's events."""
    hook = receivers()
    client = await start_gateway()
    jobs_spec = {"build": {"kind": "external"}, "deploy": {"kind": "external", "needs": ["build"]}}
    response = await client.post(
        "/api/v1/pipelines",
        json={"name": "release", "state_webhook_url": hook.url("/pipe"), "jobs": jobs_spec},
    )
    assert response.status_code == 201, response.text
    pipeline = response.json()
    other = await client.post("/api/v1/pipelines", json={"name": "other", "jobs": jobs_spec})
    assert other.status_code == 201, other.text
    scoped = await subscribe(client, hook.url("/scoped"), pipeline_id=pipeline["id"])
    jobs = {job["name"]: job for job in pipeline["jobs"]}
    for name in ("build", "deploy"):
        response = await client.post(continue_path(jobs[name]), json={"outputs": {"N": name}})
        assert response.status_code == 200, response.text
    for job in other.json()["jobs"]:
        assert (await client.post(continue_path(job))).status_code == 200

    def pipeline_done(got: list[Received]) -> bool:
        bodies = by_sequence([r for r in got if r.path == "/pipe" and r.webhook_id[0] == "p"])
        return (
            bool(bodies)
            and bodies[-1]["type"] == "pipeline.success"
            and len(bodies) == (bodies[-1]["data"]["sequence"])
        )

    await hook.wait_for(pipeline_done)
    expected: set[str] = set()
    for job in jobs.values():
        expected |= {
            f"job_{job['id']}_{e['sequence']}" for e in await job_events(client, job["id"])
        }

    def all_job_events(got: list[Received]) -> bool:
        return expected <= {r.webhook_id for r in got if r.ok and r.path == "/pipe"}

    got = await hook.wait_for(all_job_events)
    pipe = [r for r in got if r.path == "/pipe"]
    for request in pipe:
        assert_signed(request, SERVER_WEBHOOK_SECRET)
    job_ids = {r.webhook_id for r in pipe if r.webhook_id.startswith("job_")}
    assert job_ids == expected
    pipeline_events = by_sequence([r for r in pipe if r.webhook_id.startswith("pipeline_")])
    assert [b["data"]["sequence"] for b in pipeline_events] == list(
        range(1, len(pipeline_events) + 1)
    )
    assert pipeline_events[-1]["type"] == "pipeline.success"
    assert [b["type"] for b in pipeline_events] == [
        f"pipeline.{b['data']['state']}" for b in pipeline_events
    ]
    for earlier, later in itertools.pairwise(pipeline_events):
        assert later["data"]["previous_state"] == earlier["data"]["state"]
    final = await get_json(client, f"/api/v1/pipelines/{pipeline['id']}")
    assert without_event_fields(pipeline_events[-1]["data"]) == final
    for job in jobs.values():
        bodies = by_sequence(delivered_to(hook, "/pipe", job["id"]))
        states = [e["state"] for e in await job_events(client, job["id"])]
        assert [b["data"]["state"] for b in bodies] == states
        assert bodies[0]["data"]["previous_state"] is None

    await hook.wait_for(
        lambda got: any(
            r.ok and r.path == "/scoped" and r.json()["type"] == "pipeline.success" for r in got
        )
    )
    ours = {pipeline["id"], *(job["id"] for job in jobs.values())}
    scoped_log = await endpoint_deliveries(client, scoped["id"])
    assert {d["message_id"].split("_")[1] for d in scoped_log} <= ours
    last_job_event = (
        f"job_{jobs['deploy']['id']}_{len(await job_events(client, jobs['deploy']['id']))}"
    )
    last_pipeline_event = f"pipeline_{pipeline['id']}_{pipeline_events[-1]['data']['sequence']}"
    assert {last_job_event, last_pipeline_event} <= {d["message_id"] for d in scoped_log}
    for request in (r for r in hook.received if r.path == "/scoped"):
        data = request.json()["data"]
        assert pipeline["id"] in (data["id"], data.get("pipeline_id"))
        assert_signed(request, scoped["secret"])


# --- retries ----------------------------------------------------------------------------------


async def test_500_500_200_is_delivered_on_the_third_attempt_with_one_webhook_id(
    start_gateway: GatewayFactory, receivers: Receivers
) -> None:
    """Two 500s then a 200: three requests with one webhook-id and identical bodies, each signed
    afresh with its own timestamp; the delivery log shows three attempts, then succeeded."""
    hook = receivers()
    hook.plan(Reply(500, body=b"boom"), Reply(500, body=b"boom"))
    # Two retries 0.7 s +-20% apart: the first and third attempts are >= 1.12 s apart, so their
    # (whole-second) timestamps differ.
    client = await start_gateway(webhook_retry_schedule="0.7,0.7,0.7")
    endpoint = await subscribe(client, hook.url(), events=["job.pending"])
    job = await new_job(client)
    got = await hook.wait_for(lambda got: any(r.ok for r in got))
    assert [r.status for r in got] == [500, 500, 200]
    assert {r.webhook_id for r in got} == {f"job_{job['id']}_1"}
    assert len({r.body for r in got}) == 1
    for request in got:
        assert_signed(request, endpoint["secret"])
    assert got[2].timestamp > got[0].timestamp
    assert len({r.headers["webhook-signature"] for r in got}) == 3

    delivery = await poll_until(
        lambda: endpoint_deliveries(client, endpoint["id"]),
        lambda items: bool(items) and items[0]["state"] == "succeeded",
        what="delivery succeeded",
    )
    (only,) = delivery
    assert only["message_id"] == f"job_{job['id']}_1"
    assert only["event_type"] == "job.pending"
    assert only["next_attempt_at"] is None
    attempts = only["attempts"]
    assert [a["number"] for a in attempts] == [1, 2, 3]
    assert [a["status_code"] for a in attempts] == [500, 500, 200]
    assert [a["response_snippet"] for a in attempts] == ["boom", "boom", "ok"]
    assert all(a["error"] is None for a in attempts)
    assert all(
        isinstance(a["duration_ms"], int | float) and a["duration_ms"] >= 0 for a in attempts
    )
    at = [epoch(a["at"]) for a in attempts]
    assert at == sorted(at)
    assert at[1] - at[0] >= 0.7 * 0.8 - 0.01 and at[2] - at[1] >= 0.7 * 0.8 - 0.01


async def test_retry_after_is_honoured_within_bounds(
    start_gateway: GatewayFactory, receivers: Receivers
) -> None:
    """429 with Retry-After: 0 retries at once (before the 1 s schedule's jitter floor); a
    Retry-After of an hour is capped at twice the scheduled delay (seen in next_attempt_at)."""
    hook = receivers()
    hook.plan(
        Reply(429, headers={"Retry-After": "0"}),
        Reply(429, headers={"Retry-After": "3600"}),
    )
    client = await start_gateway(webhook_retry_schedule="1,1,1")
    endpoint = await subscribe(client, hook.url(), events=["job.pending"])
    await new_job(client)
    got = await hook.wait_for(lambda got: len(got) >= 2)
    assert got[1].arrived - got[0].arrived < 0.8, "Retry-After: 0 replaced the 1 s delay"
    (delivery,) = await poll_until(
        lambda: endpoint_deliveries(client, endpoint["id"]),
        lambda items: bool(items) and len(items[0]["attempts"]) == 2,
        what="two attempts logged",
    )
    assert delivery["state"] == "pending"
    assert [a["status_code"] for a in delivery["attempts"]] == [429, 429]
    wait = epoch(delivery["next_attempt_at"]) - epoch(delivery["attempts"][1]["at"])
    assert 1.7 <= wait <= 2.01, f"capped at 2 x 1 s, beyond the 20% jitter; got {wait:.3f} s"
    assert len(hook.received) == 2


async def test_an_endpoint_failing_past_disable_after_is_disabled_with_a_reason(
    start_gateway: GatewayFactory, receivers: Receivers
) -> None:
    """An endpoint whose every attempt fails for webhook_disable_after_s is disabled, says why,
    and nothing more is sent to it."""
    hook = receivers(Reply(500))
    client = await start_gateway(
        webhook_disable_after_s=1, webhook_retry_schedule=",".join(["0.1"] * 50)
    )
    endpoint = await subscribe(client, hook.url())
    job = await new_job(client)
    path = f"/api/v1/webhooks/{endpoint['id']}"
    disabled = await poll_until(
        lambda: get_json(client, path), lambda e: e["enabled"] is False, what="auto-disabled"
    )
    assert "500" in disabled["disabled_reason"]
    assert "failed" in disabled["disabled_reason"]
    log = await endpoint_deliveries(client, endpoint["id"])
    assert log and all(d["state"] in ("failed", "skipped") for d in log)
    attempts = [a for d in log for a in d["attempts"]]
    assert len(attempts) >= 2 and {a["status_code"] for a in attempts} == {500}
    assert epoch(attempts[-1]["at"]) - epoch(attempts[0]["at"]) >= 1
    assert (await client.post(continue_path(job))).status_code == 200
    after = await endpoint_deliveries(client, endpoint["id"])
    assert after[0]["event_type"] == "job.success"
    assert after[0]["state"] == "skipped", "written skipped: a disabled endpoint gets nothing"
    assert after[0]["attempts"] == []
    assert all(d["state"] != "pending" for d in after)


# --- slow receivers ---------------------------------------------------------------------------


async def test_a_hanging_receiver_delays_neither_a_transition_nor_another_endpoint(
    start_gateway: GatewayFactory, receivers: Receivers
) -> None:
    """While one receiver hangs 5 s on every request (holding its per-endpoint slots full), the
    other endpoint gets each event within a second of the transition and the continue call
    answers at once."""
    slow = receivers(Reply(200, delay_s=5))
    fast = receivers()
    client = await start_gateway(webhook_concurrency=4, webhook_endpoint_concurrency=2)
    await subscribe(client, slow.url())
    await subscribe(client, fast.url())
    jobs = []
    for n in range(3):
        before = time.monotonic()
        jobs.append(await new_job(client, name=f"job-{n}"))
        arrival = await fast.wait_for(lambda got, n=n: len(got) >= n + 1, within_s=4)
        assert arrival[n].arrived - before < 1.0
    await slow.wait_for(lambda got: len(got) >= 2)
    assert len(slow.received) == 2, "two attempts hang in the slow endpoint's two slots"
    before = time.monotonic()
    response = await client.post(continue_path(jobs[0]), json={"message": "done"})
    answered = time.monotonic() - before
    assert response.status_code == 200
    assert answered < 0.5, f"the callback waited {answered:.2f} s"
    got = await fast.wait_for(lambda got: any(r.json()["type"] == "job.success" for r in got))
    assert got[-1].arrived - before < 1.0
    assert not any(r.json()["type"] == "job.success" for r in slow.received)
    slow.release()
    expected = {f"job_{j['id']}_1" for j in jobs} | {f"job_{jobs[0]['id']}_2"}
    await slow.wait_for(lambda got: {r.webhook_id for r in got} == expected)


async def test_many_jobs_naming_one_hanging_receiver_share_one_cap(
    start_gateway: GatewayFactory, receivers: Receivers
) -> None:
    """Regression: each job's state_webhook_url is a subscription of its own, but the cap counts
    by receiver (its URL, query aside), so eight jobs naming one hanging receiver hold only its
    two slots and another endpoint still gets every event at once (they used to take every
    global slot)."""
    slow = receivers(Reply(200, delay_s=5))
    fast = receivers()
    client = await start_gateway(webhook_concurrency=4, webhook_endpoint_concurrency=2)
    await subscribe(client, fast.url())
    for n in range(8):
        await new_job(client, name=f"job-{n}", state_webhook_url=slow.url(f"/hook?job={n}"))
    await slow.wait_for(lambda got: len(got) >= 2)
    before = time.monotonic()
    extra = await new_job(client, name="extra")
    got = await fast.wait_for(
        lambda got: any(r.json()["data"]["id"] == extra["id"] for r in got), within_s=3
    )
    assert got[-1].arrived - before < 1.0
    assert len(slow.received) == 2, "the hanging receiver holds only its own two slots"
    slow.release()


async def test_a_burst_beyond_an_endpoints_cap_is_not_held_back_by_leases(
    start_gateway: GatewayFactory, receivers: Receivers
) -> None:
    """Regression: events committed together for one endpoint, more than its concurrency cap,
    all arrive promptly (claims beyond the cap used to wait out their 20 s lease)."""
    hook = receivers()
    client = await start_gateway(webhook_endpoint_concurrency=1)
    await subscribe(client, hook.url(), events=["job.*"])
    jobs = {f"step-{n}": {"kind": "external"} for n in range(6)}
    response = await client.post("/api/v1/pipelines", json={"name": "wide", "jobs": jobs})
    assert response.status_code == 201, response.text
    before = time.monotonic()
    got = await hook.wait_for(lambda got: len(got) == 6, within_s=5)
    assert got[-1].arrived - before < 3
    assert sorted(r.json()["data"]["name"] for r in got) == sorted(jobs)


# --- 410, redelivery, delete ------------------------------------------------------------------


async def test_410_disables_the_endpoint_and_redelivery_follows_the_rules(
    start_gateway: GatewayFactory, receivers: Receivers
) -> None:
    """A 410 disables the endpoint (enabled false, a reason) and skips its pending deliveries;
    redelivery on it is 409; PATCH enabled true restores it and a redelivery (202) sends the
    same webhook-id again."""
    hook = receivers()
    hook.plan(Reply(410, delay_s=30))
    client = await start_gateway(webhook_endpoint_concurrency=1)
    endpoint = await subscribe(client, hook.url())
    job = await new_job(client)
    await hook.wait_for(lambda got: len(got) == 1)  # job.pending, held by the receiver
    token_path = continue_path(job)
    assert (await client.post(f"{token_path}/start")).status_code == 200
    assert (await client.post(token_path)).status_code == 200
    hook.release()  # answer 410 now, with running and success queued behind it
    path = f"/api/v1/webhooks/{endpoint['id']}"
    disabled = await poll_until(
        lambda: get_json(client, path), lambda e: e["enabled"] is False, what="disabled by 410"
    )
    assert "410" in disabled["disabled_reason"]
    log = await poll_until(
        lambda: endpoint_deliveries(client, endpoint["id"]),
        lambda items: len(items) == 3 and all(d["state"] != "pending" for d in items),
        what="deliveries settled",
    )
    by_type = {d["event_type"]: d for d in log}
    assert by_type["job.pending"]["state"] == "failed"
    assert [a["status_code"] for a in by_type["job.pending"]["attempts"]] == [410]
    assert by_type["job.running"]["state"] == "skipped"
    assert by_type["job.success"]["state"] == "skipped"
    assert len(hook.received) == 1

    response = await client.post(f"/api/v1/deliveries/{by_type['job.success']['id']}/redeliver")
    assert response.status_code == 409, response.text
    assert response.json()["error"]

    enabled = await client.patch(path, json={"enabled": True})
    assert enabled.status_code == 200
    assert enabled.json()["enabled"] is True
    assert enabled.json()["disabled_reason"] is None
    for event_type in ("job.pending", "job.success"):
        response = await client.post(f"/api/v1/deliveries/{by_type[event_type]['id']}/redeliver")
        assert response.status_code == 202, response.text
        again = response.json()
        assert again["id"] != by_type[event_type]["id"]
        assert again["message_id"] == by_type[event_type]["message_id"]
        assert again["state"] == "pending"
        assert again["attempts"] == []
    got = await hook.wait_for(lambda got: len([r for r in got if r.ok]) == 2)
    assert sorted(r.webhook_id for r in got if r.ok) == sorted(
        by_type[t]["message_id"] for t in ("job.pending", "job.success")
    )
    for request in got:
        assert_signed(request, endpoint["secret"])
    assert got[0].body == next(r for r in got[1:] if r.webhook_id == got[0].webhook_id).body


async def test_delete_skips_the_endpoints_pending_deliveries(
    start_gateway: GatewayFactory, receivers: Receivers
) -> None:
    """DELETE of a subscription answers 204 and turns its pending deliveries (one in flight,
    others queued) into skipped; nothing more reaches the receiver."""
    hook = receivers()
    hook.plan(Reply(200, delay_s=30))
    client = await start_gateway(webhook_endpoint_concurrency=1)
    endpoint = await subscribe(client, hook.url())
    job = await new_job(client)
    await hook.wait_for(lambda got: len(got) == 1)
    token_path = continue_path(job)
    assert (await client.post(f"{token_path}/start")).status_code == 200
    assert (await client.post(token_path)).status_code == 200
    response = await client.delete(f"/api/v1/webhooks/{endpoint['id']}")
    assert response.status_code == 204
    log = await job_deliveries(client, job["id"])
    assert len(log) == 3
    assert {d["state"] for d in log} == {"skipped"}
    hook.release()
    log = await poll_until(
        lambda: job_deliveries(client, job["id"]),
        lambda items: any(d["attempts"] for d in items),
        what="the in-flight attempt recorded",
    )
    by_type = {d["event_type"]: d for d in log}
    assert [a["status_code"] for a in by_type["job.pending"]["attempts"]] == [200]
    for queued in ("job.running", "job.success"):
        assert by_type[queued]["state"] == "skipped"
        assert by_type[queued]["attempts"] == []
    assert [r.json()["type"] for r in hook.received] == ["job.pending"]


# --- rotation ---------------------------------------------------------------------------------


async def test_after_rotation_deliveries_carry_both_signatures(
    start_gateway: GatewayFactory, receivers: Receivers
) -> None:
    """After rotate-secret, each delivery carries two space-separated v1 signatures (the new one
    first), verifiable with either secret."""
    hook = receivers()
    client = await start_gateway()
    endpoint = await subscribe(client, hook.url(), events=["job.pending"])
    response = await client.post(f"/api/v1/webhooks/{endpoint['id']}/rotate-secret")
    assert response.status_code == 200
    new_secret = response.json()["secret"]
    await new_job(client)
    (request,) = await hook.wait_for(lambda got: len(got) == 1)
    entries = request.headers["webhook-signature"].split(" ")
    assert len(entries) == 2 and all(e.startswith("v1,") for e in entries)
    assert entries == [
        hand_signature(new_secret, request),
        hand_signature(endpoint["secret"], request),
    ]
    assert assert_signed(request, endpoint["secret"]) == assert_signed(request, new_secret)
    assert_not_signed(request, SERVER_WEBHOOK_SECRET)


# --- racing callbacks -------------------------------------------------------------------------


async def test_40_racing_terminal_callbacks_deliver_one_terminal_event_per_endpoint(
    start_gateway: GatewayFactory, receivers: Receivers
) -> None:
    """40 different terminal calls racing on one continue URL: one 200, and each endpoint (an
    explicit subscription and the job's own URL) gets exactly one terminal event."""
    hook = receivers()
    client = await start_gateway()
    await subscribe(client, hook.url("/all"))
    job = await new_job(client, state_webhook_url=hook.url("/own"))
    token_path = continue_path(job)

    async def call(n: int) -> int:
        body: dict[str, Any] = {"message": f"caller {n}"}
        if n % 2:
            body["status"] = "failed"
        return (await client.post(token_path, json=body)).status_code

    statuses = await asyncio.gather(*(call(n) for n in range(40)))
    assert sorted(statuses) == [200] + [409] * 39

    settled = await poll_until(
        lambda: job_deliveries(client, job["id"]),
        lambda items: len(items) == 4 and all(d["state"] == "succeeded" for d in items),
        what="every delivery succeeded",
    )
    assert sorted(d["event_type"] for d in settled).count("job.pending") == 2
    for path in ("/all", "/own"):
        terminal = {
            r.webhook_id
            for r in delivered_to(hook, path, job["id"])
            if r.json()["type"] in TERMINAL_TYPES
        }
        assert terminal == {f"job_{job['id']}_2"}
    final = await get_json(client, f"/api/v1/jobs/{job['id']}")
    (terminal_body,) = {
        r.body for r in delivered_to(hook, "/own", job["id"]) if r.webhook_id.endswith("_2")
    }
    assert without_event_fields(json.loads(terminal_body)["data"]) == final


# --- the private-address guard at connect time ------------------------------------------------


async def test_the_webhook_client_dials_loopback_only_when_allowed(
    receivers: Receivers,
) -> None:
    """The connect-time guard refuses a listening loopback server reached by name (localhost),
    by literal and by disguised or IPv4-mapped forms, and reaches it once 127.0.0.0/8 is open."""
    hook = receivers()
    targets = [
        f"http://localhost:{hook.port}/x",
        f"http://127.0.0.1:{hook.port}/x",
        f"http://127.1:{hook.port}/x",
        f"http://2130706433:{hook.port}/x",
        f"http://[::ffff:127.0.0.1]:{hook.port}/x",
    ]
    guarded = WebhookClient((), max_idle=4)
    try:
        for url in targets:
            with pytest.raises(BlockedAddress):
                await guarded.post(url, {}, b"{}", 1024)
    finally:
        await guarded.aclose()
    assert hook.received == []
    opened = WebhookClient(parse_networks(LOOPBACK), max_idle=4)
    try:
        answer = await opened.post(f"http://localhost:{hook.port}/x", {}, b"{}", 1024)
    finally:
        await opened.aclose()
    assert answer.status_code == 200
    assert [r.path for r in hook.received] == ["/x"]


@pytest.mark.parametrize(
    "host", ["127.1", "2130706433", "0x7f000001", "127.000.000.001", "0177.0.0.1"]
)
async def test_a_name_that_resolves_to_loopback_never_reaches_it(
    start_gateway: GatewayFactory, receivers: Receivers, host: str
) -> None:
    """A host that is not a literal address as written but resolves to 127.0.0.1 is refused
    (422) or accepted and then blocked at connect time: the attempt logs `blocked: ...` and the
    listening receiver gets nothing."""
    hook = receivers()
    client = await start_gateway(webhook_allow_nets=None, webhook_retry_schedule="0,0")
    url = f"http://{host}:{hook.port}/hook"
    response = await client.post("/api/v1/webhooks", json={"url": url})
    if response.status_code == 422:
        return
    assert response.status_code == 201, response.text
    endpoint = response.json()
    await new_job(client)
    (delivery,) = await poll_until(
        lambda: endpoint_deliveries(client, endpoint["id"]),
        lambda items: bool(items) and items[0]["state"] != "pending",
        what="attempts spent",
    )
    assert delivery["state"] == "failed"
    assert all(a["status_code"] is None for a in delivery["attempts"])
    assert all(a["error"].startswith("blocked: ") for a in delivery["attempts"])
    assert hook.received == []


async def test_a_subscription_allowed_then_no_longer_allowed_is_blocked_at_connect(
    tmp_path: Path, receivers: Receivers
) -> None:
    """A localhost subscription made while loopback was allowed is blocked when a gateway without
    GATEWAY_WEBHOOK_ALLOW_NETS delivers to it: `blocked: ...` in the log, nothing received."""
    hook = receivers()
    opened = create_app(gateway_settings(tmp_path, webhook_retry_schedule="0"), run_sweeper=False)
    async with running(opened) as client:
        endpoint = await subscribe(client, f"http://localhost:{hook.port}/hook")
        job = await new_job(client)  # queued while no dispatcher runs
    closed = create_app(
        gateway_settings(tmp_path, webhook_retry_schedule="0", webhook_allow_nets=None),
        run_sweeper=False,
        run_dispatcher=True,
    )
    async with running(closed) as client:
        (delivery,) = await poll_until(
            lambda: job_deliveries(client, job["id"]),
            lambda items: bool(items) and items[0]["state"] != "pending",
            what="attempts spent",
        )
    assert delivery["endpoint_id"] == endpoint["id"]
    assert delivery["state"] == "failed"
    assert len(delivery["attempts"]) == 2
    for attempt in delivery["attempts"]:
        assert attempt["error"] == "blocked: localhost resolves only to non-public addresses"
    assert hook.received == []


async def test_a_stored_url_the_http_client_cannot_parse_fails_its_delivery_visibly(
    tmp_path: Path, receivers: Receivers
) -> None:
    """Regression: a subscription row whose URL httpx refuses (written before the API checked
    it) gets logged attempts with the error and ends failed, instead of a silent retry loop."""
    hook = receivers()
    settings = gateway_settings(tmp_path, webhook_retry_schedule="0", webhook_allow_nets=None)
    app = create_app(settings, run_sweeper=False, run_dispatcher=True)
    async with running(app) as client:
        url = f"http://127.000.000.001:{hook.port}/hook"
        assert (await client.post("/api/v1/webhooks", json={"url": url})).status_code == 422
        ctx = app.state.ctx
        now = time.time()
        await ctx.store.create_endpoint(ctx.ids.new(now), EndpointSpec(url=url), JOB_SECRET, now)
        job = await new_job(client)
        (delivery,) = await poll_until(
            lambda: job_deliveries(client, job["id"]),
            lambda items: bool(items) and items[0]["state"] != "pending",
            what="attempts spent",
        )
    assert delivery["state"] == "failed"
    assert len(delivery["attempts"]) == 2
    assert all(a["error"].startswith("InvalidURL: ") for a in delivery["attempts"])
    assert hook.received == []


# --- crash ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_with_deliveries_pending_loses_no_event(
    server_factory: Any, receivers: Receivers
) -> None:
    """SIGKILL of `gateway serve` while one attempt hangs and the others are being refused
    (503): after a restart every event arrives, and deduplicated by webhook-id the (job,
    sequence) pairs received are exactly all the jobs' events."""
    hook = receivers(Reply(503))
    hook.plan(Reply(503, delay_s=60))  # the first attempt hangs until released
    env = {
        "GATEWAY_WEBHOOK_ALLOW_NETS": LOOPBACK,
        "GATEWAY_WEBHOOK_RETRY_SCHEDULE": ",".join(["0.2"] * 40),
        "GATEWAY_WEBHOOK_TIMEOUT_S": "1",
    }
    server = server_factory(env=env)
    with server.client() as http:
        response = http.post("/api/v1/webhooks", json={"url": hook.url()})
        assert response.status_code == 201, response.text
        secret = response.json()["secret"]
        jobs = []
        for n in range(5):
            response = http.post("/api/v1/jobs", json={"name": f"job-{n}"})
            assert response.status_code == 201, response.text
            jobs.append(response.json())
        for n, job in enumerate(jobs):
            assert http.post(f"{job['continue_url']}/start").status_code == 200
            body = {"status": "failed", "exit_code": 3} if n % 2 else {}
            assert http.post(job["continue_url"], json=body).status_code == 200
        hook.wait_for_sync(lambda got: len(got) >= 4)
    server.kill9()
    assert not hook.delivered(), "nothing was accepted before the crash"
    hook.set_default(Reply(200))
    hook.release()

    server = server_factory(env=env)
    with server.client() as http:
        expected = set()
        for job in jobs:
            response = http.get(f"/api/v1/jobs/{job['id']}/events")
            assert response.status_code == 200
            expected |= {(job["id"], e["sequence"]) for e in response.json()["items"]}
    assert len(expected) == 15

    def everything(got: list[Received]) -> bool:
        return {(r.json()["data"]["id"], r.json()["data"]["sequence"]) for r in got if r.ok} >= (
            expected
        )

    hook.wait_for_sync(everything, within_s=30)
    delivered = hook.delivered()
    assert {(r.json()["data"]["id"], r.json()["data"]["sequence"]) for r in delivered.values()} == (
        expected
    )
    assert set(delivered) == {f"job_{job_id}_{seq}" for job_id, seq in expected}
    for request in delivered.values():
        assert_signed(request, secret)
