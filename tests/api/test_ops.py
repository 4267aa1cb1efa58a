"""Operations routes: health, readiness, metrics, the OpenAPI document, and JSON answers for
unknown routes and wrong methods."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.clock import ManualClock
from gateway.config import DEFAULT_CALLBACK_TIMEOUT_S
from tests.conftest import continue_path, create_job, sweep

ERROR_REF = "#/components/schemas/Error"
_CONVERTER = re.compile(r"\{(\w+)(?::\w+)?\}")


def assert_error_shape(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["detail"], str)


def metric_value(exposition: str, sample: str) -> float:
    """The value of one sample line (`name{labels}`) of a Prometheus exposition."""
    for line in exposition.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    raise AssertionError(f"{sample} not in metrics:\n{exposition}")


async def test_healthz_and_readyz_answer_200(anon: httpx.AsyncClient) -> None:
    """/healthz and /readyz answer 200 JSON while the app and its database are up."""
    health = await anon.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = await anon.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


async def test_metrics_count_transitions_callbacks_and_sweeper_lag(
    app: Starlette, client: httpx.AsyncClient, anon: httpx.AsyncClient, clock: ManualClock
) -> None:
    """/metrics exposes job transitions by state, callbacks by outcome and the sweeper's lag,
    with the values of what happened."""
    finished = await create_job(client, name="finished")
    await anon.post(continue_path(finished), json={})
    await anon.post(continue_path(finished), json={})  # exact repeat: replayed
    await create_job(client, name="forgotten")
    clock.advance(DEFAULT_CALLBACK_TIMEOUT_S + 30)
    assert await sweep(app) == 1

    response = await anon.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for family in (
        "gateway_job_transitions_total",
        "gateway_callbacks_total",
        "gateway_sweeper_lag_seconds",
    ):
        assert f"# TYPE {family.removesuffix('_total')}" in text
    assert metric_value(text, 'gateway_job_transitions_total{state="pending"}') == 2
    assert metric_value(text, 'gateway_job_transitions_total{state="success"}') == 1
    assert metric_value(text, 'gateway_job_transitions_total{state="failed"}') == 1
    assert metric_value(text, 'gateway_callbacks_total{outcome="applied"}') == 1
    assert metric_value(text, 'gateway_callbacks_total{outcome="replayed"}') == 1
    assert metric_value(text, "gateway_sweeper_lag_seconds") == pytest.approx(30)


@pytest.fixture
async def openapi(anon: httpx.AsyncClient) -> dict[str, Any]:
    response = await anon.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document: dict[str, Any] = response.json()
    return document


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    return [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in methods
    ]


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


async def test_openapi_is_an_openapi_3_1_document(openapi: dict[str, Any]) -> None:
    """/openapi.json is OpenAPI 3.1 with info, paths, and every $ref resolving in components."""
    assert openapi["openapi"].startswith("3.1.")
    assert openapi["info"]["title"]
    assert openapi["info"]["version"]
    assert openapi["paths"]
    schemas = openapi["components"]["schemas"]
    for ref in _refs(openapi):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    for path, method, operation in _operations(openapi):
        assert operation["responses"], (method, path)
        for status in operation["responses"]:
            assert re.fullmatch(r"[1-5]\d\d", status), (method, path, status)
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"\{(\w+)\}", path)), (method, path)


async def test_openapi_documents_every_route_of_the_app(
    app: Starlette, openapi: dict[str, Any]
) -> None:
    """Every route the app serves appears in the document's paths with each of its methods,
    except the dashboard's HTML pages (`include_in_schema=False`), none of them under /api or
    /continue."""
    routes = [route for route in app.routes if isinstance(route, Route)]
    pages = [route.path for route in routes if not route.include_in_schema]
    assert "/login" in pages
    assert [path for path in pages if path.startswith(("/api", "/continue"))] == []
    served = [
        (_CONVERTER.sub(r"{\1}", route.path), method.lower())
        for route in routes
        if route.include_in_schema
        for method in route.methods or ()
        if method != "HEAD"
    ]
    assert ("/api/v1/jobs", "post") in served
    missing = [
        (method, path) for path, method in served if method not in openapi["paths"].get(path, {})
    ]
    assert missing == []


async def test_openapi_errors_use_the_error_schema(openapi: dict[str, Any]) -> None:
    """Every documented error response is JSON with the Error schema; every authenticated
    operation documents its 401."""
    error = openapi["components"]["schemas"]["Error"]
    assert set(error["required"]) >= {"error", "detail"}
    for path, method, operation in _operations(openapi):
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": ERROR_REF}, (method, path, status)
        if operation.get("security"):
            assert "401" in operation["responses"], (method, path)


async def test_openapi_has_the_request_schemas(openapi: dict[str, Any]) -> None:
    """Components carry JobSpec and ContinueBody, and the create and continue routes use them."""
    schemas = openapi["components"]["schemas"]
    assert "name" in schemas["JobSpec"]["properties"]
    assert "name" in schemas["JobSpec"]["required"]
    assert {"status", "exit_code", "outputs"} <= set(schemas["ContinueBody"]["properties"])
    create = openapi["paths"]["/api/v1/jobs"]["post"]["requestBody"]
    assert create["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobSpec"
    }
    finish = openapi["paths"]["/continue/{token}"]["post"]["requestBody"]
    assert finish["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ContinueBody"
    }


@pytest.mark.parametrize("path", ["/nope", "/api/v2/jobs", "/api/v1/jobz", "/continue"])
async def test_unknown_route_is_a_404_json_error(client: httpx.AsyncClient, path: str) -> None:
    """A path the app does not serve -> 404 with the JSON error shape."""
    assert_error_shape(await client.get(path), 404, "not_found")
    assert_error_shape(await client.post(path, json={}), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/api/v1/jobs", {"GET", "POST"}),
        ("PUT", "/api/v1/jobs", {"GET", "POST"}),
        ("PATCH", "/api/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV", {"GET"}),
        ("GET", "/api/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV/cancel", {"POST"}),
        ("POST", "/healthz", {"GET"}),
        ("DELETE", "/metrics", {"GET"}),
        ("PUT", "/continue/some-token", {"GET", "POST"}),
    ],
)
async def test_wrong_method_is_a_405_json_error(
    client: httpx.AsyncClient, method: str, path: str, allowed: set[str]
) -> None:
    """A known path with a method it does not serve -> 405 with the JSON error shape and an
    Allow header naming every method the path serves (its routes are split per method)."""
    response = await client.request(method, path)
    assert_error_shape(response, 405, "method_not_allowed")
    listed = {name.strip() for name in response.headers["allow"].split(",")}
    assert allowed <= listed
    assert method not in listed


# --- what the document says matches what the routes do (found by tests/integration/test_api_fuzz)


def _operation(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    operation: dict[str, Any] = document["paths"][path][method]
    return operation


async def _runner_and_job(client: httpx.AsyncClient) -> tuple[str, dict[str, Any]]:
    """A registered runner's token and a job it was handed (still unconfirmed)."""
    runner = (await client.post("/api/v1/runners", json={})).json()
    await create_job(client, kind="script", script=["true"])
    response = await client.post(
        "/api/v1/runner/jobs/request",
        json={"wait_s": 0},
        headers={"Authorization": f"Bearer {runner['token']}"},
    )
    assert response.status_code == 201, response.text
    return runner["token"], response.json()


async def test_openapi_documents_the_empty_long_poll(
    client: httpx.AsyncClient, openapi: dict[str, Any]
) -> None:
    """A long poll with nothing to hand out answers 204, and the document lists it."""
    runner_token, _ = await _runner_and_job(client)
    response = await client.post(
        "/api/v1/runner/jobs/request",
        json={"wait_s": 0},
        headers={"Authorization": f"Bearer {runner_token}"},
    )
    assert response.status_code == 204
    assert "204" in _operation(openapi, "post", "/api/v1/runner/jobs/request")["responses"]


async def test_openapi_job_routes_take_the_job_token_not_a_runner_token(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, openapi: dict[str, Any]
) -> None:
    """The runner's calls about one job are documented as authenticated by `Job-Token` (an
    apiKey scheme), since a runner token alone is refused there with 401."""
    runner_token, handout = await _runner_and_job(client)
    path = f"/api/v1/runner/jobs/{handout['id']}"
    refused = await anon.put(
        path, json={"state": "running"}, headers={"Authorization": f"Bearer {runner_token}"}
    )
    assert_error_shape(refused, 401, "unauthorized")
    confirmed = await anon.put(
        path, json={"state": "running"}, headers={"Job-Token": handout["token"]}
    )
    assert confirmed.status_code == 200, confirmed.text
    assert openapi["components"]["securitySchemes"]["job"] == {
        "type": "apiKey",
        "in": "header",
        "name": "Job-Token",
        "description": openapi["components"]["securitySchemes"]["job"]["description"],
    }
    for method, job_path in [
        ("put", "/api/v1/runner/jobs/{job_id}"),
        ("patch", "/api/v1/runner/jobs/{job_id}/trace"),
        ("put", "/api/v1/runner/jobs/{job_id}/artifacts/{name}"),
    ]:
        assert _operation(openapi, method, job_path)["security"] == [{"job": []}], job_path
    request = _operation(openapi, "post", "/api/v1/runner/jobs/request")
    assert request["security"] == [{"runner": []}]


async def test_openapi_trace_append_documents_its_body_and_range(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, openapi: dict[str, Any]
) -> None:
    """The trace append documents its (required) text body and the `Content-Range` forms the
    route accepts; a range outside that pattern is a 400."""
    operation = _operation(openapi, "patch", "/api/v1/runner/jobs/{job_id}/trace")
    assert operation["requestBody"]["required"] is True
    assert "text/plain" in operation["requestBody"]["content"]
    (content_range,) = [p for p in operation["parameters"] if p["name"] == "Content-Range"]
    pattern = re.compile(content_range["schema"]["pattern"])
    for good in ("0-4", "bytes 0-4", "10-19"):
        assert pattern.fullmatch(good), good
    for bad in ("0-", "a-b", "bytes=0-4", "0 - 4", "-1-4"):
        assert not pattern.fullmatch(bad), bad

    _, handout = await _runner_and_job(client)
    path = f"/api/v1/runner/jobs/{handout['id']}"
    job_token = {"Job-Token": handout["token"]}
    assert (await anon.put(path, json={"state": "running"}, headers=job_token)).status_code == 200
    for good in ("0-4", "bytes 5-9"):
        response = await anon.patch(
            f"{path}/trace", content=b"hello", headers={**job_token, "Content-Range": good}
        )
        assert response.status_code == 202, response.text
    response = await anon.patch(
        f"{path}/trace", content=b"hello", headers={**job_token, "Content-Range": "bytes=10-14"}
    )
    assert_error_shape(response, 400, "malformed")


async def test_openapi_event_stream_is_documented_as_server_sent_events(
    openapi: dict[str, Any],
) -> None:
    """The event stream is documented as `text/event-stream` (what it serves), each event with
    its id, type and the webhook body as JSON data."""
    content = _operation(openapi, "get", "/api/v1/events/stream")["responses"]["200"]["content"]
    assert list(content) == ["text/event-stream"]
    event = content["text/event-stream"]["schema"]
    assert event["required"] == ["id", "event", "data"]
    data = event["properties"]["data"]
    assert data["contentMediaType"] == "application/json"
    assert data["contentSchema"] == {"$ref": "#/components/schemas/WebhookEvent"}
    body = openapi["components"]["schemas"]["WebhookEvent"]
    assert body["required"] == ["type", "timestamp", "data"]


@pytest.mark.parametrize(
    ("path", "required"),
    [
        ("/api/v1/jobs", True),
        ("/api/v1/pipelines", True),
        ("/api/v1/webhooks", True),
        ("/api/v1/tokens", True),
        ("/api/v1/runners", False),
    ],
)
async def test_openapi_marks_a_body_required_where_an_empty_one_is_refused(
    client: httpx.AsyncClient, openapi: dict[str, Any], path: str, required: bool
) -> None:
    """A request body the route cannot do without is marked required; an optional one is
    not (an empty body there reads as `{}`)."""
    response = await client.post(path, content=b"")
    if required:
        assert_error_shape(response, 422, "invalid")
    else:
        assert response.status_code == 201, response.text
    assert _operation(openapi, "post", path)["requestBody"]["required"] is required


async def test_openapi_marks_the_webhook_patch_body_required(
    client: httpx.AsyncClient, openapi: dict[str, Any]
) -> None:
    """`PATCH /api/v1/webhooks/{id}` with no body is a 422, and its body is marked required."""
    hook = (
        await client.post("/api/v1/webhooks", json={"url": "https://hooks.example.com/in"})
    ).json()
    response = await client.patch(f"/api/v1/webhooks/{hook['id']}", content=b"")
    assert_error_shape(response, 422, "invalid")
    operation = _operation(openapi, "patch", "/api/v1/webhooks/{webhook_id}")
    assert operation["requestBody"]["required"] is True


async def test_openapi_documents_the_artifact_name_pattern(
    anon: httpx.AsyncClient, client: httpx.AsyncClient, openapi: dict[str, Any]
) -> None:
    """Artifact names in the document carry the pattern the upload routes enforce."""
    goods = ("report.txt", "a", "A-b_c.9", "x" * 128)
    for method, path in [
        ("put", "/continue/{token}/artifacts/{name}"),
        ("put", "/api/v1/runner/jobs/{job_id}/artifacts/{name}"),
        ("get", "/api/v1/jobs/{job_id}/artifacts/{name}"),
    ]:
        (name,) = [
            p for p in _operation(openapi, method, path)["parameters"] if p["name"] == "name"
        ]
        pattern = re.compile(name["schema"]["pattern"])
        for good in goods:
            assert pattern.fullmatch(good), good
        for bad in ("", "x" * 129, "a b", "é", "a:b"):
            assert not pattern.fullmatch(bad), bad
    job = await create_job(client)
    for good in goods:
        upload = await anon.put(f"{continue_path(job)}/artifacts/{good}", content=b"1")
        assert upload.status_code == 201, upload.text
    upload = await anon.put(f"{continue_path(job)}/artifacts/a%20b", content=b"1")
    assert_error_shape(upload, 422, "invalid")
