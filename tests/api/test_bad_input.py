"""Bad input never breaks the server: random JSON and bytes at the write routes, odd path
parameters everywhere. Never a 5xx; every refusal is the JSON error shape; a refused callback
leaves its continue URL usable."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from gateway.api.continuation import UNKNOWN_TOKEN_DETAIL
from tests.conftest import continue_path, create_job

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    # The app (a function-scoped fixture) is shared by the examples on purpose: each example
    # makes its own job, so none depends on another's leftovers.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

_text = st.text(max_size=20) | st.sampled_from(["\ud800", "\udfff", "\x00", "", "é" * 3])
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | _text
)
json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=12,
)


def _objects(
    required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the route's fields: either every value plausible (mostly accepted, so what
    is stored must read back), or each value sometimes anything (mostly refused)."""

    def near(fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, st.SearchStrategy[Any]]:
        return {name: values | json_values for name, values in fields.items()}

    return st.fixed_dictionaries(required, optional=optional) | st.fixed_dictionaries(
        near(required), optional=near(optional)
    )


_seconds = st.integers(min_value=-5, max_value=10**8)
job_objects = _objects(
    {"name": st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,140}\Z")},
    {
        "kind": st.sampled_from(["external", "script"]),
        "script": st.lists(st.text(max_size=10), max_size=3),
        "async": st.booleans(),
        "timeout_s": _seconds,
        "callback_timeout_s": _seconds,
        "heartbeat_timeout_s": _seconds,
        "queue_timeout_s": _seconds,
        "variables": st.dictionaries(
            st.from_regex(r"\A[A-Z_]{1,8}\Z"),
            st.text(max_size=8) | st.fixed_dictionaries({"value": _text, "masked": st.booleans()}),
            max_size=3,
        ),
        "metadata": json_values,
        "state_webhook_url": st.sampled_from(["https://hooks.example.com/x", "ftp://x", ""]),
        "state_webhook_secret": st.text(max_size=20),
        "tags": st.lists(st.text(max_size=70), max_size=3),
        "continue_on_get": st.booleans(),
    },
)
continue_objects = _objects(
    {},
    {
        "status": st.sampled_from(["success", "failed", "SUCCESS"]),
        "exit_code": st.integers(min_value=-(2**33), max_value=2**33),
        "message": st.text(max_size=30),
        "outputs": st.dictionaries(st.from_regex(r"\A[A-Za-z_0-9]{1,8}\Z"), _text, max_size=3),
        "result": json_values,
    },
)


def _encoded(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """JSON text of the values, sometimes with NaN/Infinity tokens or raw non-ASCII (both are
    for the server to refuse or accept, never to crash on)."""
    return st.tuples(values, st.booleans()).map(
        lambda pair: json.dumps(pair[0], ensure_ascii=pair[1]).encode("utf-8", "surrogatepass")
    )


def bodies(objects: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return (
        _encoded(objects)
        | _encoded(json_values)
        | st.binary(max_size=200)
        | _encoded(objects).map(lambda raw: raw[: len(raw) // 2])
    )


def assert_json_error(response: httpx.Response) -> dict[str, Any]:
    """A refusal: a 4xx with the JSON error shape."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body: dict[str, Any] = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["detail"], str)
    return body


@FUZZ
@given(raw=bodies(job_objects))
@example(raw=b"")
@example(raw=b"[]")
@example(raw=b'{"name": "deploy", "metadata": 1e999}')
@example(raw=b'{"name": "deploy", "metadata": 123456789012345678901234567890}')
@example(raw=b'{"name": "deploy", "timeout_s": 123456789012345678901234567890}')
@example(raw=b'{"name": "deploy", "metadata": "\\ud800"}')
@example(raw=b'{"name": "\x80deploy"}')
@example(raw=b'{"name": "deploy", "metadata": "\xff\xfe"}')
@example(raw=b'{"name": "deploy", "metadata": ' + b"[" * 2000 + b"]" * 2000 + b"}")
async def test_random_bodies_at_create_job_never_break_the_server(
    client: httpx.AsyncClient, raw: bytes
) -> None:
    """POST /api/v1/jobs with any bytes: 201 with a job that reads back, or a 4xx JSON error."""
    response = await client.post(
        "/api/v1/jobs", content=raw, headers={"content-type": "application/json"}
    )
    event(f"status {response.status_code}")
    if response.status_code != 201:
        assert_json_error(response)
        return
    sent = json.loads(raw)
    job = response.json()
    shown = await client.get(f"/api/v1/jobs/{job['id']}")
    assert shown.status_code == 200
    assert shown.json()["state"] == "pending"
    for field in ("name", "metadata", "tags"):
        assert shown.json()[field] == sent.get(field, job[field]), field
    assert (await client.get("/api/v1/jobs", params={"limit": 1})).status_code == 200


_idempotency_keys = st.none() | st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=300
)


@FUZZ
@given(raw=bodies(continue_objects), key=_idempotency_keys)
@example(raw=b"", key=None)
@example(raw=b"null", key=None)
@example(raw=b'{"status": "success", "exit_code": 3}', key=None)
@example(raw=b'{"exit_code": 99999999999999999999}', key=None)
@example(raw=b'{"result": 1e999}', key=None)
@example(raw=b'{"outputs": {"A": "\\ud800"}}', key=None)
@example(raw=b'{"message": "\xc3"}', key=None)
@example(raw=b'{"result": ' + b"[" * 965 + b"]" * 965 + b"}", key=None)
@example(raw=b"{}", key="")
@example(raw=b"{}", key="k" * 256)
async def test_random_bodies_at_a_continue_url_never_break_it(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, raw: bytes, key: str | None
) -> None:
    """POST /continue/{token} of a live job with any bytes: 200 finishing the job, or a 4xx JSON
    error after which the job is still pending and its URL still finishes it."""
    job = await create_job(client)
    path = continue_path(job)
    headers = {} if key is None else {"Idempotency-Key": key}
    response = await anon.post(path, content=raw, headers=headers)
    event(f"status {response.status_code}")
    if response.status_code == 200:
        assert response.json()["job_id"] == job["id"]
        state = response.json()["state"]
        assert state in ("success", "failed")
        sent = json.loads(raw) if raw else {}
        shown = (await client.get(f"/api/v1/jobs/{job['id']}")).json()
        assert shown["state"] == state
        assert shown["result"] == sent.get("result")
        assert shown["message"] == sent.get("message")
        assert shown["outputs"] == (sent.get("outputs") or {})
        return
    assert_json_error(response)
    assert response.status_code in (400, 422), response.text
    shown = await anon.get(path)
    assert shown.status_code == 200
    assert shown.json()["state"] == "pending"
    finished = await anon.post(path, json={"message": "after a refused call"})
    assert finished.status_code == 200
    assert finished.json()["state"] == "success"


async def test_nesting_is_capped_but_reasonable_depth_is_kept(client: httpx.AsyncClient) -> None:
    """JSON nested 60 deep is stored and read back; nested past the cap it is refused with 400,
    whatever the depth (deep enough to overflow the stack included)."""
    deep: Any = "bottom"
    for _ in range(60):
        deep = [deep]
    job = await create_job(client, metadata=deep)
    shown = (await client.get(f"/api/v1/jobs/{job['id']}")).json()
    assert shown["metadata"] == deep
    for depth in (70, 965, 100_000):
        raw = b'{"name": "deploy", "metadata": ' + b"[" * depth + b"]" * depth + b"}"
        body = assert_json_error(await client.post("/api/v1/jobs", content=raw))
        assert body["error"] == "malformed"
    brackets_in_strings = json.dumps({"name": "deploy", "metadata": "[{" * 5000}).encode()
    assert (await client.post("/api/v1/jobs", content=brackets_in_strings)).status_code == 201


_path_text = st.text(min_size=1, max_size=60).filter(
    lambda s: "/" not in s and s not in {".", ".."}
)


@FUZZ
@given(value=_path_text)
@example(value="A" * 10_000)
@example(value="é" * 3_000)
@example(value="01ARZ3NDEKTSV4RRFFQ69G5FAV")
@example(value="\x00")
@example(value="' OR 1=1 --")
@example(value="%2F..%2F")
@example(value="😀" * 50)
async def test_odd_path_parameters_are_404(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, value: str
) -> None:
    """Ids and tokens with odd characters or huge lengths -> 404 JSON on every route, never a
    5xx; an odd token gets the one unknown-token body."""
    segment = quote(value, safe="")
    job_routes = [
        ("GET", f"/api/v1/jobs/{segment}"),
        ("POST", f"/api/v1/jobs/{segment}/cancel"),
        ("POST", f"/api/v1/jobs/{segment}/retry"),
        ("GET", f"/api/v1/jobs/{segment}/trace"),
        ("GET", f"/api/v1/jobs/{segment}/events"),
    ]
    for method, path in job_routes:
        body = assert_json_error(await client.request(method, path))
        assert body["error"] == "not_found", (method, path)
    continue_routes = [
        ("GET", f"/continue/{segment}"),
        ("POST", f"/continue/{segment}"),
        ("POST", f"/continue/{segment}/start"),
        ("POST", f"/continue/{segment}/heartbeat"),
        ("POST", f"/continue/{segment}/log"),
    ]
    for method, path in continue_routes:
        response = await anon.request(method, path, content=b"{}")
        assert response.status_code == 404, (method, path, response.text)
        assert response.json() == {"error": "not_found", "detail": UNKNOWN_TOKEN_DETAIL}


@FUZZ
@given(value=st.text(min_size=1, max_size=40))
async def test_path_parameters_with_slashes_never_break_the_server(
    client: httpx.AsyncClient, value: str
) -> None:
    """Any text (slashes and dot segments included) under the job routes: a 3xx/4xx answer, a
    JSON error for every 4xx, never a 5xx."""
    response = await client.get(f"/api/v1/jobs/{quote(value, safe='/')}")
    assert response.status_code < 500
    if response.status_code >= 400:
        assert_json_error(response)
