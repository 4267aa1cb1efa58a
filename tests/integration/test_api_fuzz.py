"""API fuzzing with schemathesis: every operation of the `/openapi.json` the real app serves,
with schema-valid and schema-violating requests, sent with valid credentials, with none and with
a token of the wrong kind. Never a 5xx; every error is the JSON error shape; every answer is a
documented status with a body matching its documented schema; a route that needs credentials
answers 401 without them.

The app runs in-process (schemathesis' ASGI transport, which also runs its lifespan) on a real
SQLite file. Before each operation is fuzzed, fresh objects are seeded through the API (jobs in
every state, a pipeline, runners, a webhook with deliveries, a token, an artifact and its signed
links) and the generated path ids, continue tokens and job tokens are often replaced by theirs,
so the fuzzer reaches existing objects and live credentials, not only 404s."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    missing_required_header,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core import NotSet
from schemathesis.core.parameters import ParameterLocation
from schemathesis.python import asgi
from schemathesis.schemas import APIOperation
from starlette.applications import Starlette

from gateway.api.openapi import build_openapi
from gateway.app import create_app
from gateway.artifacts import ArtifactLinks
from gateway.clock import ManualClock
from gateway.config import Settings
from tests.conftest import ADMIN_TOKEN, SECRET_KEY

EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "20"))
PUBLIC_URL = f"http://{asgi.HOST}"
ARTIFACT = "report.txt"
TRACE = b"hello"
# Every request has a deadline: a hang fails at once instead of at the suite's timeout.
REQUEST_TIMEOUT_S = 10.0
# The event stream never ends by itself; it is read for this long, then cut.
STREAM_READ_S = 0.2
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    missing_required_header,
]
CREDENTIAL_HEADERS = ("authorization", "job-token", "cookie")
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

OPERATIONS = sorted(
    (path, method.upper())
    for path, item in build_openapi()["paths"].items()
    for method in item
    if method in ("get", "head", "post", "put", "patch", "delete")
)


@dataclass
class Seeds:
    """Objects that exist before an operation is fuzzed; fresh ones for every operation."""

    named: dict[str, str]
    path_values: dict[str, list[str]]
    job_tokens: list[tuple[str, str]]
    trace_sizes: dict[str, int]


@dataclass(frozen=True)
class Target:
    """The running app, the schema it serves, and a client that reaches it in-process."""

    app: Starlette
    schema: Any
    http: requests.Session
    clock: ManualClock


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The real app on a real SQLite file; the schema is what its `/openapi.json` serves."""
    clock = ManualClock()
    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "data"
    app = create_app(
        Settings(
            data_dir=data_dir,
            admin_token=ADMIN_TOKEN,
            secret_key=SECRET_KEY,
            public_url=PUBLIC_URL,
        ),
        clock=clock,
        run_sweeper=False,
    )
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        schema.config.update(request_timeout=REQUEST_TIMEOUT_S)
        with asgi.get_client(app) as http:
            http.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
            yield Target(app=app, schema=schema, http=http, clock=clock)
    finally:
        asgi.shutdown_lifespans()


_round = itertools.count()


def _ok(response: requests.Response, status: int) -> Any:
    assert response.status_code == status, (response.status_code, response.text)
    return response.json() if response.content else None


def _continue_token(url: str) -> str:
    assert url.startswith(f"{PUBLIC_URL}/continue/"), url
    return url.rsplit("/", 1)[1]


def seed(target: Target) -> Seeds:
    """Through the API: a webhook (so every later transition queues a delivery), a worker and
    a victim runner, a viewer token, external jobs pending (with a trace and an artifact),
    succeeded and canceled, script jobs running, waiting (async) and handed out but unconfirmed,
    one left pending for the fuzzer's runner, and a two-job pipeline whose second job is not
    ready."""
    http = target.http
    tag = f"seed{next(_round)}"
    anon = {"Authorization": ""}
    hook = _ok(
        http.post(
            "/api/v1/webhooks", json={"url": "https://hooks.example.com/in", "events": ["*"]}
        ),
        201,
    )
    worker = _ok(http.post("/api/v1/runners", json={"tags": [tag], "run_untagged": False}), 201)
    victim = _ok(http.post("/api/v1/runners", json={"description": "victim"}), 201)
    viewer = _ok(
        http.post("/api/v1/tokens", json={"name": f"victim-{tag}", "scope": "viewer"}), 201
    )

    def external(**fields: Any) -> tuple[str, str]:
        job = _ok(http.post("/api/v1/jobs", json={"name": "ext", **fields}), 201)
        return job["id"], _continue_token(job["continue_url"])

    def handed_out(**fields: Any) -> tuple[str, str, dict[str, Any]]:
        body = {"name": "script", "kind": "script", "script": ["true"], "tags": [tag], **fields}
        job_id = _ok(http.post("/api/v1/jobs", json=body), 201)["id"]
        handout = _ok(
            http.post(
                "/api/v1/runner/jobs/request",
                json={"wait_s": 0},
                headers={"Authorization": f"Bearer {worker['token']}"},
            ),
            201,
        )
        assert handout["id"] == job_id
        return job_id, handout["token"], handout

    def runner_put(job_id: str, job_token: str, body: dict[str, Any]) -> None:
        _ok(
            http.put(
                f"/api/v1/runner/jobs/{job_id}", json=body, headers={**anon, "Job-Token": job_token}
            ),
            200,
        )

    pending_id, pending_token = external(continue_on_get=True)
    _ok(
        http.put(
            f"/continue/{pending_token}/artifacts/{ARTIFACT}",
            data=b"all good",
            headers={**anon, "Content-Type": "text/plain"},
        ),
        201,
    )
    _ok(http.post(f"/continue/{pending_token}/log", data=b"step 1\n", headers=anon), 200)
    done_id, done_token = external()
    _ok(http.post(f"/continue/{done_token}", json={"message": "done"}, headers=anon), 200)
    canceled_id, canceled_token = external()
    _ok(http.post(f"/api/v1/jobs/{canceled_id}/cancel"), 200)

    running_id, running_job_token, _ = handed_out()
    runner_put(running_id, running_job_token, {"state": "running"})
    _ok(
        http.patch(
            f"/api/v1/runner/jobs/{running_id}/trace",
            data=TRACE,
            headers={
                **anon,
                "Job-Token": running_job_token,
                "Content-Range": f"0-{len(TRACE) - 1}",
            },
        ),
        202,
    )
    waiting_id, waiting_job_token, handout = handed_out(**{"async": True})
    runner_put(waiting_id, waiting_job_token, {"state": "running"})
    runner_put(waiting_id, waiting_job_token, {"state": "success", "exit_code": 0})
    url = next(v["value"] for v in handout["variables"] if v["key"] == "CI_JOB_CONTINUE_URL")
    waiting_token = _continue_token(url)
    unconfirmed_id, unconfirmed_job_token, _ = handed_out()
    queued_id = _ok(
        http.post(
            "/api/v1/jobs",
            json={"name": "queued", "kind": "script", "script": ["true"], "tags": [tag]},
        ),
        201,
    )["id"]

    pipeline = _ok(
        http.post(
            "/api/v1/pipelines",
            json={
                "name": "fuzz",
                "jobs": {
                    "first": {"kind": "external"},
                    "second": {"kind": "external", "needs": ["first"]},
                },
            },
        ),
        201,
    )
    pipeline_tokens = [_continue_token(job["continue_url"]) for job in pipeline["jobs"]]
    deliveries = _ok(http.get(f"/api/v1/webhooks/{hook['id']}/deliveries"), 200)["items"]
    assert deliveries

    links = ArtifactLinks(SECRET_KEY, PUBLIC_URL, ttl_s=3600)
    now = target.clock.now()
    fresh_link = links.mint(pending_id, ARTIFACT, now)[0]
    expired_link = links.mint(pending_id, ARTIFACT, now - 7200)[0]

    job_ids = [pending_id, done_id, canceled_id, running_id, waiting_id, unconfirmed_id, queued_id]
    named = {
        "tag": tag,
        "pending": pending_id,
        "pending_token": pending_token,
        "done": done_id,
        "running": running_id,
        "running_job_token": running_job_token,
        "waiting_token": waiting_token,
        "pipeline": pipeline["id"],
        "runner": victim["id"],
        "runner_token": worker["token"],
        "webhook": hook["id"],
        "delivery": deliveries[0]["id"],
        "api_token": viewer["id"],
        "link": fresh_link.rsplit("/", 1)[1],
    }
    return Seeds(
        named=named,
        path_values={
            "job_id": job_ids + [job["id"] for job in pipeline["jobs"]],
            "pipeline_id": [pipeline["id"]],
            "runner_id": [victim["id"]],
            "webhook_id": [hook["id"]],
            "delivery_id": [d["id"] for d in deliveries[:5]],
            "token_id": [viewer["id"], "admin"],
            "token": [pending_token, done_token, canceled_token, waiting_token, *pipeline_tokens],
            "name": [ARTIFACT],
            "signed": [fresh_link.rsplit("/", 1)[1], expired_link.rsplit("/", 1)[1]],
        },
        job_tokens=[
            (running_id, running_job_token),
            (waiting_id, waiting_job_token),
            (unconfirmed_id, unconfirmed_job_token),
        ],
        trace_sizes={running_id: len(TRACE)},
    )


def happy_requests(seeds: Seeds) -> dict[tuple[str, str], dict[str, Any]]:
    """One request per operation that must succeed on fresh seeds (the arguments of
    `APIOperation.Case`), so every operation's success answer is checked against its schema."""
    n = seeds.named
    job_token = {"Job-Token": n["running_job_token"]}
    assert seeds.job_tokens[0] == (n["running"], n["running_job_token"])
    webhook = {"webhook_id": n["webhook"]}
    text = {"Content-Type": "text/plain"}
    return {
        ("/api/v1/jobs", "POST"): {"body": {"name": "happy", "metadata": {"k": [1]}}},
        ("/api/v1/jobs", "GET"): {"query": {"state": "pending", "limit": 2}},
        ("/api/v1/jobs/{job_id}", "GET"): {"path_parameters": {"job_id": n["pending"]}},
        ("/api/v1/jobs/{job_id}/cancel", "POST"): {"path_parameters": {"job_id": n["pending"]}},
        ("/api/v1/jobs/{job_id}/retry", "POST"): {"path_parameters": {"job_id": n["done"]}},
        ("/api/v1/jobs/{job_id}/trace", "GET"): {
            "path_parameters": {"job_id": n["running"]},
            "query": {"offset": 1},
        },
        ("/api/v1/jobs/{job_id}/events", "GET"): {"path_parameters": {"job_id": n["done"]}},
        ("/api/v1/jobs/{job_id}/deliveries", "GET"): {"path_parameters": {"job_id": n["done"]}},
        ("/api/v1/jobs/{job_id}/artifacts/{name}", "GET"): {
            "path_parameters": {"job_id": n["pending"], "name": ARTIFACT}
        },
        ("/artifacts/{signed}", "GET"): {"path_parameters": {"signed": n["link"]}},
        ("/continue/{token}", "POST"): {
            "path_parameters": {"token": n["pending_token"]},
            "body": {"status": "failed", "exit_code": 2, "outputs": {"A": "b"}, "result": [1]},
            "headers": {"Idempotency-Key": "k1"},
        },
        ("/continue/{token}", "GET"): {"path_parameters": {"token": n["waiting_token"]}},
        ("/continue/{token}", "HEAD"): {"path_parameters": {"token": n["waiting_token"]}},
        ("/continue/{token}/start", "POST"): {"path_parameters": {"token": n["pending_token"]}},
        ("/continue/{token}/heartbeat", "POST"): {"path_parameters": {"token": n["waiting_token"]}},
        ("/continue/{token}/log", "POST"): {
            "path_parameters": {"token": n["waiting_token"]},
            "body": "line\n",
            "media_type": "text/plain",
        },
        ("/continue/{token}/artifacts/{name}", "PUT"): {
            "path_parameters": {"token": n["waiting_token"], "name": "out.json"},
            "body": b'{"ok": true}',
            "media_type": "application/octet-stream",
        },
        ("/api/v1/pipelines", "POST"): {
            "body": {
                "name": "happy",
                "variables": {"V": {"value": "x", "masked": True}},
                "jobs": {
                    "build": {"script": ["make"], "tags": [n["tag"]]},
                    "deploy": {"kind": "external", "needs": ["build"]},
                },
            }
        },
        ("/api/v1/pipelines", "GET"): {"query": {"state": "pending", "limit": 1}},
        ("/api/v1/pipelines/{pipeline_id}", "GET"): {
            "path_parameters": {"pipeline_id": n["pipeline"]}
        },
        ("/api/v1/pipelines/{pipeline_id}/cancel", "POST"): {
            "path_parameters": {"pipeline_id": n["pipeline"]}
        },
        ("/api/v1/runners", "POST"): {"body": {"description": "happy", "tags": ["a"]}},
        ("/api/v1/runners", "GET"): {"query": {"limit": 1}},
        ("/api/v1/runners/{runner_id}", "DELETE"): {"path_parameters": {"runner_id": n["runner"]}},
        ("/api/v1/runner/jobs/request", "POST"): {"body": {"wait_s": 0}},
        ("/api/v1/runner/jobs/{job_id}", "PUT"): {
            "path_parameters": {"job_id": n["running"]},
            "headers": job_token,
            "body": {"state": "running"},
        },
        ("/api/v1/runner/jobs/{job_id}/trace", "PATCH"): {
            "path_parameters": {"job_id": n["running"]},
            "headers": {**job_token, "Content-Range": f"{len(TRACE)}-{len(TRACE) + 2}"},
            "body": "abc",
            "media_type": "text/plain",
        },
        ("/api/v1/runner/jobs/{job_id}/artifacts/{name}", "PUT"): {
            "path_parameters": {"job_id": n["running"], "name": "log.txt"},
            "headers": {**job_token, **text},
            "body": b"bytes",
            "media_type": "application/octet-stream",
        },
        ("/api/v1/webhooks", "POST"): {
            "body": {"url": "https://hooks.example.com/2", "events": ["job.*", "pipeline.success"]}
        },
        ("/api/v1/webhooks", "GET"): {"query": {"limit": 1}},
        ("/api/v1/webhooks/{webhook_id}", "GET"): {"path_parameters": webhook},
        ("/api/v1/webhooks/{webhook_id}", "PATCH"): {
            "path_parameters": webhook,
            "body": {"enabled": True, "events": ["*"]},
        },
        ("/api/v1/webhooks/{webhook_id}", "DELETE"): {"path_parameters": webhook},
        ("/api/v1/webhooks/{webhook_id}/rotate-secret", "POST"): {"path_parameters": webhook},
        ("/api/v1/webhooks/{webhook_id}/deliveries", "GET"): {"path_parameters": webhook},
        ("/api/v1/deliveries/{delivery_id}/redeliver", "POST"): {
            "path_parameters": {"delivery_id": n["delivery"]}
        },
        ("/api/v1/events/stream", "GET"): {"query": {"last_event_id": 0}},
        ("/api/v1/tokens", "POST"): {"body": {"name": f"happy-{n['tag']}", "scope": "viewer"}},
        ("/api/v1/tokens", "GET"): {"query": {"limit": 2}},
        ("/api/v1/tokens/{token_id}", "DELETE"): {"path_parameters": {"token_id": n["api_token"]}},
        ("/healthz", "GET"): {},
        ("/readyz", "GET"): {},
        ("/metrics", "GET"): {},
        ("/openapi.json", "GET"): {},
    }


def _negatable(operation: APIOperation) -> bool:
    """Whether schemathesis can make schema-violating requests for the operation: a query, a
    header, a JSON or text body, or a path parameter with a pattern (the others take any
    string)."""
    definition = operation.definition.raw
    media = definition.get("requestBody", {}).get("content", {})
    parameters = definition.get("parameters", [])
    return (
        any(p["in"] in ("query", "header") for p in parameters)
        or any("pattern" in p["schema"] for p in parameters)
        or any(m in media for m in ("application/json", "text/plain"))
    )


def _security(operation: APIOperation) -> str:
    """`api` (API token or session), `runner` (runner token), `job` (job token) or `none`."""
    security = operation.definition.raw.get("security", [])
    for scheme, name in (("bearer", "api"), ("runner", "runner"), ("job", "job")):
        if {scheme: []} in security:
            return name
    return "none"


def _credentials(security: str, seeds: Seeds, choice: int | None) -> dict[str, str]:
    """Valid credentials for the operation (on job routes, the token of the seeded job that
    `_use_seeds` puts in the path)."""
    if security == "api":
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    if security == "runner":
        return {"Authorization": f"Bearer {seeds.named['runner_token']}"}
    if security == "job":
        return {"Job-Token": seeds.job_tokens[(choice or 0) % len(seeds.job_tokens)][1]}
    return {}


def _foreign_credentials(security: str, seeds: Seeds) -> dict[str, str]:
    """A real token of the wrong kind: a runner token on the API, the admin token on the
    runner API (runner tokens are valid there only, and API tokens are not)."""
    if security == "api":
        return {"Authorization": f"Bearer {seeds.named['runner_token']}"}
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _check(case: Case, response: requests.Response, headers: dict[str, str]) -> None:
    """The schema's checks, then the contract's error shape."""
    case.validate_response(response, checks=CHECKS, headers=headers)
    if response.status_code >= 400 and case.method.upper() != "HEAD":
        body = response.json()
        assert isinstance(body, dict), body
        assert isinstance(body.get("error"), str), body
        assert isinstance(body.get("detail"), str), body


def _negative_at(case: Case, location: ParameterLocation) -> bool:
    return case.meta is not None and case.meta.is_negative_at(location)


def _use_seeds(case: Case, seeds: Seeds, choice: int | None, security: str) -> None:
    """Point the case at seeded objects: every path parameter (an existing id, a live token;
    on job routes of the runner API, a job whose token `_credentials` sends), and a trace
    append at the end of the job's trace. Parts generated to be invalid stay so."""
    if choice is None:
        return
    if case.path_parameters and not _negative_at(case, ParameterLocation.PATH):
        for name in case.path_parameters:
            values = seeds.path_values.get(name)
            if values:
                case.path_parameters[name] = values[choice % len(values)]
        if security == "job":
            case.path_parameters["job_id"] = seeds.job_tokens[choice % len(seeds.job_tokens)][0]
    if (
        case.headers
        and "Content-Range" in case.headers
        and isinstance(case.body, str)
        and not _negative_at(case, ParameterLocation.HEADER)
    ):
        start = seeds.trace_sizes.get(case.path_parameters["job_id"], 0)
        case.headers["Content-Range"] = f"{start}-{start + len(case.body.encode()) - 1}"


def _bounded_long_poll(case: Case) -> None:
    """A runner's long poll waits up to `wait_s` (default 30 s) of real time: ask for 0. (A
    body generated to be invalid is refused before any wait, and stays as it is.)"""
    if isinstance(case.body, NotSet):
        case.body = {"wait_s": 0}
    elif isinstance(case.body, dict) and not _negative_at(case, ParameterLocation.BODY):
        case.body["wait_s"] = 0


def _strip_credentials(case: Case) -> None:
    for name in list(case.headers or {}):
        if name.lower() in CREDENTIAL_HEADERS:
            del case.headers[name]
    if case.cookies:
        case.cookies.clear()


def _only_sent(response: requests.Response, credentials: dict[str, str]) -> bool:
    """Whether the request carried exactly these credentials and no others."""
    sent = {name.lower(): value for name, value in response.request.headers.items()}
    expected = {name.lower(): value for name, value in credentials.items()}
    return {k: v for k, v in sent.items() if k in CREDENTIAL_HEADERS} == expected


def test_every_operation_is_fuzzed(target: Target) -> None:
    """The fuzzed document is the one the app serves, and every operation in it has a request
    that must succeed on the seeds."""
    assert target.schema.raw_schema == build_openapi()
    assert set(happy_requests(seed(target))) == set(OPERATIONS)
    assert {_security(target.schema[p][m]) for p, m in OPERATIONS} == {
        "api",
        "runner",
        "job",
        "none",
    }


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_fuzz_operation(target: Target, path: str, method: str) -> None:
    """One request that must succeed, then schema-valid and schema-violating ones, each sent
    with valid credentials, with none and with a token of the wrong kind: never a 5xx, always
    a documented status and body, errors in the JSON error shape, and 401 whenever a route's
    credentials are missing or of the wrong kind."""
    operation = target.schema[path][method]
    security = _security(operation)
    seeds = seed(target)
    timeout = STREAM_READ_S if path == "/api/v1/events/stream" else REQUEST_TIMEOUT_S

    def send(case: Case, credentials: dict[str, str]) -> requests.Response:
        # A copy: schemathesis adds its own headers to the dict it is given.
        response = case.call(headers=dict(credentials), timeout=timeout)
        _check(case, response, credentials)
        if response.status_code == 202 and security == "job" and "size" in response.json():
            seeds.trace_sizes[case.path_parameters["job_id"]] = response.json()["size"]
        return response

    valid = _credentials(security, seeds, None)
    response = send(operation.Case(**happy_requests(seeds)[(path, method)]), valid)
    assert 200 <= response.status_code < 300, response.text

    modes = [GenerationMode.POSITIVE]
    if _negatable(operation):
        modes.append(GenerationMode.NEGATIVE)
    cases = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes))

    @FUZZ
    @given(case=cases, choice=st.none() | st.integers(min_value=0, max_value=1000))
    def fuzz(case: Case, choice: int | None) -> None:
        _use_seeds(case, seeds, choice, security)
        if path == "/api/v1/runner/jobs/request":
            _bounded_long_poll(case)
        valid = _credentials(security, seeds, choice)
        response = send(case, valid)
        if security == "api" and _only_sent(response, valid):
            assert response.status_code not in (401, 403), response.text
        if security == "none":
            return
        _strip_credentials(case)
        for credentials in ({}, _foreign_credentials(security, seeds)):
            response = send(case, credentials)
            if _only_sent(response, credentials):
                assert response.status_code == 401, response.text

    fuzz()
