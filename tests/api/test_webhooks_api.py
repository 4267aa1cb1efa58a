"""`/api/v1/webhooks` on the real app (no allow-listed networks): subscriptions, their
secrets, the private-address guard at subscription time, 404s and authentication."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from tests.api.test_jobs import assert_error

PUBLIC_URL = "https://hooks.example.com/gateway"
GOOD_SECRET = "whsec_c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cy0wMTIzNDU2Nzg5YWI="
UNKNOWN_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"

# Literal targets that are not globally routable: each must be refused as written.
PRIVATE_URLS = [
    "http://127.0.0.1/hook",
    "http://127.8.9.10:8080/hook",
    "http://10.0.0.5/hook",
    "http://172.16.3.4/hook",
    "http://192.168.1.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/hook",
    "http://0.0.0.0/hook",
    "http://224.0.0.1/hook",
    "http://[::1]/hook",
    "http://[::]/hook",
    "http://[fe80::1]/hook",
    "http://[fc00::1]/hook",
    "http://[fd12:3456::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[::ffff:169.254.169.254]/hook",
    "http://[::ffff:a00:1]/hook",
    "http://[64:ff9b::a00:1]/hook",
    "http://localhost/hook",
    "http://LOCALHOST:8080/hook",
    "http://api.localhost/hook",
]

MALFORMED_URLS = [
    "ftp://hooks.example.com/x",
    "hooks.example.com/x",
    "http:///nohost",
    "https://user:pass@hooks.example.com/x",
    "http://127.000.000.001/x",
    "http://0177.0.0.1/x",
]

BAD_SECRETS = [
    "not-a-secret",
    "whsec_",
    "whsec_!!!not-base64!!!",
    "whsec_" + base64.b64encode(b"too short").decode(),
    "whsec_" + base64.b64encode(b"x" * 65).decode(),
]


async def subscribe(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/webhooks", json={"url": PUBLIC_URL, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_secret(value: str) -> None:
    """A `whsec_` secret holding 32 random bytes."""
    assert value.startswith("whsec_")
    assert len(base64.b64decode(value.removeprefix("whsec_"), validate=True)) == 32


# --- create, read, list -------------------------------------------------------------------


async def test_create_answers_201_with_a_secret_shown_only_there(
    client: httpx.AsyncClient,
) -> None:
    """POST answers 201 with the subscription and a whsec_ secret that GET and list never show."""
    created = await subscribe(client, events=["job.*", "pipeline.success"])
    assert_secret(created["secret"])
    assert created["url"] == PUBLIC_URL
    assert created["events"] == ["job.*", "pipeline.success"]
    assert created["enabled"] is True
    assert created["disabled_reason"] is None
    assert created["pipeline_id"] is None

    fetched = await client.get(f"/api/v1/webhooks/{created['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == {k: v for k, v in created.items() if k != "secret"}
    listed = await client.get("/api/v1/webhooks")
    assert listed.status_code == 200
    assert [item["id"] for item in listed.json()["items"]] == [created["id"]]
    for response in (fetched, listed):
        assert created["secret"] not in response.text
        assert "secret" not in response.text


async def test_every_subscription_gets_its_own_secret(client: httpx.AsyncClient) -> None:
    """Two subscriptions to the same URL get different secrets."""
    first = await subscribe(client)
    second = await subscribe(client)
    assert first["id"] != second["id"]
    assert first["secret"] != second["secret"]


async def test_events_default_to_everything_and_accept_patterns(
    client: httpx.AsyncClient,
) -> None:
    """`events` defaults to every event; `*`, `job.*` and exact types are accepted."""
    assert (await subscribe(client))["events"] == []
    for events in (["*"], ["job.*"], ["pipeline.*", "job.success", "job.failed"]):
        assert (await subscribe(client, events=events))["events"] == events


async def test_list_pages_with_a_cursor(client: httpx.AsyncClient) -> None:
    """The list pages through every subscription exactly once; a bad cursor is 400."""
    ids = {(await subscribe(client))["id"] for _ in range(5)}
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        response = await client.get("/api/v1/webhooks", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)
    assert_error(await client.get("/api/v1/webhooks", params={"cursor": "garbage"}), 400)


async def test_a_public_literal_address_is_accepted(client: httpx.AsyncClient) -> None:
    """A globally routable literal address is a valid target."""
    assert (await subscribe(client, url="http://93.184.216.34/hook"))["enabled"] is True


# --- 422 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", PRIVATE_URLS)
async def test_private_literal_targets_are_refused_with_422(
    client: httpx.AsyncClient, url: str
) -> None:
    """A literal loopback/private/link-local/metadata/CGNAT/mapped address or localhost is 422."""
    body = assert_error(await client.post("/api/v1/webhooks", json={"url": url}), 422)
    assert "url" in body["detail"]
    assert (await client.get("/api/v1/webhooks")).json()["items"] == []


@pytest.mark.parametrize("url", MALFORMED_URLS)
async def test_malformed_urls_are_refused_with_422(client: httpx.AsyncClient, url: str) -> None:
    """A URL that is not http(s) with a host, or that carries credentials, is 422."""
    assert_error(await client.post("/api/v1/webhooks", json={"url": url}), 422)


@pytest.mark.parametrize(
    "events", [["job.done"], ["job"], ["pipeline.skipped"], ["build.*"], ["job.*", "nope"]]
)
async def test_unknown_event_patterns_are_refused_with_422(
    client: httpx.AsyncClient, events: list[str]
) -> None:
    """A pattern that matches no event type is 422 naming it."""
    response = await client.post("/api/v1/webhooks", json={"url": PUBLIC_URL, "events": events})
    body = assert_error(response, 422)
    assert "events" in body["detail"]


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"url": 42},
        {"url": ""},
        {"url": PUBLIC_URL, "events": "job.*"},
        {"url": PUBLIC_URL, "secret": GOOD_SECRET},
        {"url": PUBLIC_URL, "enabled": "yes"},
    ],
)
async def test_bad_subscription_bodies_are_422(
    client: httpx.AsyncClient, payload: dict[str, Any]
) -> None:
    """A missing or mistyped field, or an unknown one (a secret cannot be chosen), is 422."""
    assert_error(await client.post("/api/v1/webhooks", json=payload), 422)


async def test_patch_checks_url_and_events_like_create(client: httpx.AsyncClient) -> None:
    """PATCH refuses a private literal URL and unknown patterns with 422, changing nothing."""
    created = await subscribe(client, events=["job.*"])
    path = f"/api/v1/webhooks/{created['id']}"
    assert_error(await client.patch(path, json={"url": "http://169.254.169.254/"}), 422)
    assert_error(await client.patch(path, json={"events": ["job.finished"]}), 422)
    assert_error(await client.patch(path, json={"secret": GOOD_SECRET}), 422)
    after = (await client.get(path)).json()
    assert after["url"] == PUBLIC_URL
    assert after["events"] == ["job.*"]


@pytest.mark.parametrize(
    "url", ["http://10.1.2.3/x", "http://[::ffff:127.0.0.1]/", "http://localhost/"]
)
async def test_job_state_webhook_url_with_a_private_literal_is_422(
    client: httpx.AsyncClient, url: str
) -> None:
    """A job's state_webhook_url is guarded like a subscription: a private literal is 422."""
    response = await client.post("/api/v1/jobs", json={"name": "deploy", "state_webhook_url": url})
    body = assert_error(response, 422)
    assert "state_webhook_url" in body["detail"]
    assert (await client.get("/api/v1/jobs")).json()["items"] == []


async def test_pipeline_state_webhook_url_with_a_private_literal_is_422(
    client: httpx.AsyncClient,
) -> None:
    """A pipeline's state_webhook_url, or one of its jobs', with a private literal is 422."""
    jobs = {"build": {"kind": "external"}}
    response = await client.post(
        "/api/v1/pipelines",
        json={"name": "p", "jobs": jobs, "state_webhook_url": "http://192.168.0.10/hook"},
    )
    assert "state_webhook_url" in assert_error(response, 422)["detail"]
    response = await client.post(
        "/api/v1/pipelines",
        json={
            "name": "p",
            "jobs": {"build": {"kind": "external", "state_webhook_url": "http://[fe80::1]/"}},
        },
    )
    detail = assert_error(response, 422)["detail"]
    assert "build" in detail and "state_webhook_url" in detail
    assert (await client.get("/api/v1/pipelines")).json()["items"] == []


@pytest.mark.parametrize("secret", BAD_SECRETS)
async def test_a_bad_state_webhook_secret_is_422(client: httpx.AsyncClient, secret: str) -> None:
    """A state_webhook_secret that is not whsec_ + base64 of 24..64 bytes is 422, on a job and
    on a pipeline."""
    response = await client.post(
        "/api/v1/jobs",
        json={"name": "deploy", "state_webhook_url": PUBLIC_URL, "state_webhook_secret": secret},
    )
    assert "state_webhook_secret" in assert_error(response, 422)["detail"]
    response = await client.post(
        "/api/v1/pipelines",
        json={
            "name": "p",
            "jobs": {"build": {"kind": "external"}},
            "state_webhook_url": PUBLIC_URL,
            "state_webhook_secret": secret,
        },
    )
    assert "state_webhook_secret" in assert_error(response, 422)["detail"]


async def test_a_good_state_webhook_secret_is_accepted_and_never_shown(
    client: httpx.AsyncClient,
) -> None:
    """A whsec_ state_webhook_secret is accepted on a pipeline and never echoed back."""
    response = await client.post(
        "/api/v1/pipelines",
        json={
            "name": "p",
            "jobs": {"build": {"kind": "external"}},
            "state_webhook_url": PUBLIC_URL,
            "state_webhook_secret": GOOD_SECRET,
        },
    )
    assert response.status_code == 201, response.text
    assert GOOD_SECRET not in response.text
    pipeline = await client.get(f"/api/v1/pipelines/{response.json()['id']}")
    assert GOOD_SECRET not in pipeline.text


# --- patch, rotate, delete ----------------------------------------------------------------


async def test_patch_changes_only_what_is_given(client: httpx.AsyncClient) -> None:
    """PATCH changes the fields given and keeps the others."""
    created = await subscribe(client, events=["job.*"])
    path = f"/api/v1/webhooks/{created['id']}"
    response = await client.patch(path, json={"url": "https://other.example.org/in"})
    assert response.status_code == 200, response.text
    assert response.json()["url"] == "https://other.example.org/in"
    assert response.json()["events"] == ["job.*"]
    response = await client.patch(path, json={"events": ["pipeline.*"]})
    assert response.json()["events"] == ["pipeline.*"]
    assert response.json()["url"] == "https://other.example.org/in"
    assert "secret" not in response.text


async def test_patch_enabled_false_then_true(client: httpx.AsyncClient) -> None:
    """PATCH enabled false disables with a reason; enabled true restores and clears it."""
    created = await subscribe(client)
    path = f"/api/v1/webhooks/{created['id']}"
    disabled = (await client.patch(path, json={"enabled": False})).json()
    assert disabled["enabled"] is False
    assert disabled["disabled_reason"]
    enabled = (await client.patch(path, json={"enabled": True})).json()
    assert enabled["enabled"] is True
    assert enabled["disabled_reason"] is None


async def test_rotate_secret_shows_a_new_secret_once(client: httpx.AsyncClient) -> None:
    """rotate-secret answers 200 with a new whsec_ secret, never shown again."""
    created = await subscribe(client)
    response = await client.post(f"/api/v1/webhooks/{created['id']}/rotate-secret")
    assert response.status_code == 200, response.text
    rotated = response.json()
    assert_secret(rotated["secret"])
    assert rotated["secret"] != created["secret"]
    assert rotated["id"] == created["id"]
    fetched = await client.get(f"/api/v1/webhooks/{created['id']}")
    assert rotated["secret"] not in fetched.text


async def test_delete_answers_204_and_the_subscription_is_gone(client: httpx.AsyncClient) -> None:
    """DELETE answers 204; then GET, PATCH, rotate, deliveries and a second DELETE are 404."""
    created = await subscribe(client)
    path = f"/api/v1/webhooks/{created['id']}"
    response = await client.delete(path)
    assert response.status_code == 204
    assert response.content == b""
    assert_error(await client.get(path), 404)
    assert_error(await client.patch(path, json={"enabled": True}), 404)
    assert_error(await client.post(f"{path}/rotate-secret"), 404)
    assert_error(await client.get(f"{path}/deliveries"), 404)
    assert_error(await client.delete(path), 404)
    assert (await client.get("/api/v1/webhooks")).json()["items"] == []


# --- 404 and 401 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/api/v1/webhooks/{UNKNOWN_ID}"),
        ("PATCH", f"/api/v1/webhooks/{UNKNOWN_ID}"),
        ("DELETE", f"/api/v1/webhooks/{UNKNOWN_ID}"),
        ("POST", f"/api/v1/webhooks/{UNKNOWN_ID}/rotate-secret"),
        ("GET", f"/api/v1/webhooks/{UNKNOWN_ID}/deliveries"),
        ("GET", f"/api/v1/jobs/{UNKNOWN_ID}/deliveries"),
        ("POST", f"/api/v1/deliveries/{UNKNOWN_ID}/redeliver"),
    ],
)
async def test_unknown_ids_are_404(client: httpx.AsyncClient, method: str, path: str) -> None:
    """Every webhook route answers 404 in the JSON error shape for an unknown id."""
    body = {"enabled": True} if method == "PATCH" else None
    assert_error(await client.request(method, path, json=body), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/webhooks"),
        ("GET", "/api/v1/webhooks"),
        ("GET", f"/api/v1/webhooks/{UNKNOWN_ID}"),
        ("PATCH", f"/api/v1/webhooks/{UNKNOWN_ID}"),
        ("DELETE", f"/api/v1/webhooks/{UNKNOWN_ID}"),
        ("POST", f"/api/v1/webhooks/{UNKNOWN_ID}/rotate-secret"),
        ("GET", f"/api/v1/webhooks/{UNKNOWN_ID}/deliveries"),
        ("GET", f"/api/v1/jobs/{UNKNOWN_ID}/deliveries"),
        ("POST", f"/api/v1/deliveries/{UNKNOWN_ID}/redeliver"),
    ],
)
async def test_webhook_routes_need_a_token(
    anon: httpx.AsyncClient, client: httpx.AsyncClient, method: str, path: str
) -> None:
    """Without a token, or with a wrong one, every webhook route is 401 (before any 404)."""
    body = {"url": PUBLIC_URL} if method in ("POST", "PATCH") else None
    assert_error(await anon.request(method, path, json=body), 401)
    wrong = {"Authorization": "Bearer gw_not-a-real-token"}
    assert_error(await anon.request(method, path, json=body, headers=wrong), 401)
    assert (await client.get("/api/v1/webhooks")).json()["items"] == []


async def test_job_deliveries_of_a_job_without_subscribers_is_empty(
    client: httpx.AsyncClient,
) -> None:
    """A job nobody subscribes to has an empty delivery log (200, not 404)."""
    job = (await client.post("/api/v1/jobs", json={"name": "deploy"})).json()
    response = await client.get(f"/api/v1/jobs/{job['id']}/deliveries")
    assert response.status_code == 200
    assert response.json() == {"items": [], "next_cursor": None}
