"""Request bodies (continue call, job spec), ids, the wire form of a job, and list cursors."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from ulid import ULID

from gateway.errors import InvalidField, MalformedRequest
from gateway.models import (
    ContinueCall,
    IdGenerator,
    Job,
    JobSpec,
    decode_body,
    job_to_wire,
)
from gateway.states import Deadlines, FailureReason, Kind, State
from gateway.store.base import decode_cursor, encode_cursor
from gateway.tokens import ContinueTokens
from tests.conftest import create_job

NOW = 1_800_000_000.0


def _parse(body: Any, key: str | None = None) -> ContinueCall:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return ContinueCall.parse(raw, key)


# --- ContinueCall.parse ----------------------------------------------------------------------


def test_empty_body_is_the_same_call_as_an_empty_object() -> None:
    """An empty body counts as `{}`: success, and the same digest for replay."""
    empty, braces = _parse(b""), _parse(b"{}")
    assert empty == braces
    assert empty.succeeded
    assert empty.exit_code is None
    assert empty.message is None
    assert empty.outputs is None
    assert empty.result_json is None


@pytest.mark.parametrize(
    ("body", "succeeded"),
    [
        ({}, True),
        ({"exit_code": 0}, True),
        ({"exit_code": 3}, False),
        ({"exit_code": -1}, False),
        ({"status": "success"}, True),
        ({"status": "success", "exit_code": 0}, True),
        ({"status": "failed"}, False),
        ({"status": "failed", "exit_code": 0}, False),
        ({"status": "failed", "exit_code": 2}, False),
        ({"message": "done"}, True),
    ],
)
def test_status_defaults_to_success_or_to_failed_on_nonzero_exit(
    body: dict[str, Any], succeeded: bool
) -> None:
    """`status` defaults to success, or failed when exit_code is non-zero."""
    assert _parse(body).succeeded is succeeded


def test_success_with_nonzero_exit_code_is_invalid() -> None:
    """`status: success` with a non-zero exit_code contradicts itself: 422."""
    with pytest.raises(InvalidField):
        _parse({"status": "success", "exit_code": 1})


@pytest.mark.parametrize(
    "body",
    [
        {"outputs": {"A": 1}},
        {"outputs": {"A": None}},
        {"outputs": {"A": ["x"]}},
        {"outputs": {"A": {"nested": "x"}}},
        {"outputs": ["A"]},
        {"outputs": "A=1"},
    ],
)
def test_outputs_must_map_names_to_strings(body: dict[str, Any]) -> None:
    """outputs become variables: only string values are allowed."""
    with pytest.raises(InvalidField):
        _parse(body)


@pytest.mark.parametrize("name", ["", "1A", "a-b", "a b", "a.b", "é", "A" * 129, "$X"])
def test_output_names_must_be_variable_names(name: str) -> None:
    """An output key that is not a valid variable name is refused."""
    with pytest.raises(InvalidField):
        _parse({"outputs": {name: "x"}})


def test_valid_outputs_and_fields_are_kept() -> None:
    """A full call keeps exit code, message, outputs and result."""
    call = _parse(
        {
            "status": "failed",
            "exit_code": 7,
            "message": "broke",
            "outputs": {"A": "1", "_b2": ""},
            "result": {"k": [1, 2]},
        },
        key="idem-1",
    )
    assert not call.succeeded
    assert call.exit_code == 7
    assert call.message == "broke"
    assert call.outputs == {"A": "1", "_b2": ""}
    assert call.result_json is not None
    assert json.loads(call.result_json) == {"k": [1, 2]}
    assert call.idempotency_key == "idem-1"


@pytest.mark.parametrize(
    "raw", [b"{", b"{'a': 1}", b"nul", b'{"status": "success",}', b"\xff\xfe", b"{}{}"]
)
def test_malformed_json_is_a_malformed_request(raw: bytes) -> None:
    """A body that is not JSON at all is 400, not 422."""
    with pytest.raises(MalformedRequest):
        ContinueCall.parse(raw, None)


@pytest.mark.parametrize("raw", [b"[]", b'["success"]', b'"success"', b"1", b"null", b"true"])
def test_json_that_is_not_an_object_is_invalid(raw: bytes) -> None:
    """Valid JSON of the wrong shape (an array, a scalar) is 422."""
    with pytest.raises(InvalidField):
        ContinueCall.parse(raw, None)


@pytest.mark.parametrize(
    "body",
    [
        {"state": "success"},
        {"Status": "success"},
        {"status": "ok"},
        {"status": "canceled"},
        {"exit_code": "1"},
        {"exit_code": 1.5},
        {"exit_code": 2**40},
        {"message": 5},
    ],
)
def test_unknown_or_mistyped_fields_are_invalid(body: dict[str, Any]) -> None:
    """An unknown field, a wrong enum value or a wrong type is 422 naming the problem."""
    with pytest.raises(InvalidField) as error:
        _parse(body)
    assert error.value.detail


def test_json_equal_bodies_give_the_same_digest() -> None:
    """Key order and whitespace do not matter: an exact repeat is recognized."""
    first = b'{"status": "failed", "message": "m", "result": {"a": 1, "b": [1, {"x": 2, "y": 3}]}}'
    second = b'{"result":{"b":[1,{"y":3,"x":2}],"a":1},"message":"m","status":"failed"}'
    assert ContinueCall.parse(first, None).digest == ContinueCall.parse(second, None).digest
    assert ContinueCall.parse(b"{}", None).digest == ContinueCall.parse(b" { } ", None).digest


@pytest.mark.parametrize(
    "other",
    [
        {"status": "success"},
        {"exit_code": 0},
        {"message": "m"},
        {"message": "M"},
        {"outputs": {}},
        {"outputs": {"A": "1"}},
        {"result": 0},
        {"result": "x"},
        {"result": [1, 2]},
        {"result": [2, 1]},
        {"status": "failed"},
    ],
)
def test_different_bodies_give_different_digests(other: dict[str, Any]) -> None:
    """Anything that changes the call changes its digest (so it is not taken for a repeat)."""
    assert _parse(other).digest != _parse({}).digest
    assert _parse(other).digest != _parse({**other, "message": "different"}).digest


def test_digest_does_not_depend_on_the_idempotency_key() -> None:
    """The key identifies a repeat on its own; the body digest is about the body only."""
    assert _parse({}, "a").digest == _parse({}, "b").digest == _parse({}).digest


# --- JobSpec ---------------------------------------------------------------------------------


def _spec(**fields: Any) -> JobSpec:
    return decode_body(json.dumps({"name": "deploy", **fields}).encode(), JobSpec)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"kind": "external", "callback_timeout_s": 60, "heartbeat_timeout_s": 10},
        {"kind": "script", "script": ["echo hi"]},
        {"kind": "script", "script": ["true"], "async": True, "queue_timeout_s": 5},
        {"state_webhook_url": "https://example.com/hook"},
        {"state_webhook_url": "http://example.com/hook"},
    ],
)
def test_valid_job_specs_pass_the_checks(fields: dict[str, Any]) -> None:
    """Well-formed specs decode and pass the cross-field rules."""
    _spec(**fields).check()


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "script"},
        {"kind": "script", "script": []},
        {"script": ["echo hi"]},
        {"kind": "external", "script": []},
        {"async": True},
        {"queue_timeout_s": 10},
        {"state_webhook_url": "ftp://example.com"},
        {"state_webhook_url": "example.com/hook"},
    ],
)
def test_job_spec_cross_field_rules(fields: dict[str, Any]) -> None:
    """Scripts only on script jobs (and required there), async and queue timeouts only on
    script jobs, webhook URLs only http(s)."""
    spec = _spec(**fields)
    with pytest.raises(InvalidField):
        spec.check()


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": "-starts-with-dash"},
        {"name": "x" * 129},
        {"name": "ok", "unknown": 1},
        {"name": "ok", "kind": "shell"},
        {"name": "ok", "timeout_s": 0},
        {"name": "ok", "timeout_s": -5},
        {"name": "ok", "callback_timeout_s": "60"},
        {"name": "ok", "variables": {"1BAD": "x"}},
        {"name": "ok", "variables": {"GOOD": 1}},
        {"name": "ok", "tags": [""]},
    ],
)
def test_job_spec_types_are_enforced_on_decode(body: dict[str, Any]) -> None:
    """A missing name, unknown field or wrongly typed value is refused with InvalidField."""
    with pytest.raises(InvalidField):
        decode_body(json.dumps(body).encode(), JobSpec)


def test_job_spec_defaults_to_an_external_job() -> None:
    """`kind` defaults to external on the jobs route."""
    spec = _spec()
    assert spec.kind is Kind.EXTERNAL
    assert not spec.is_async


# --- ids -------------------------------------------------------------------------------------


def test_ids_strictly_increase_within_one_millisecond() -> None:
    """Many ids minted at the same instant are unique and sort in minting order."""
    ids = IdGenerator()
    minted = [ids.new(NOW) for _ in range(2000)]
    assert minted == sorted(minted)
    assert len(set(minted)) == len(minted)
    assert all(len(i) == 26 for i in minted)
    assert ULID.from_str(minted[0]).timestamp == pytest.approx(NOW, abs=0.001)


def test_ids_keep_increasing_when_the_clock_steps_back() -> None:
    """A clock that goes backwards never produces a smaller id."""
    ids = IdGenerator()
    first = ids.new(NOW)
    assert ids.new(NOW - 60) > first
    assert ids.new(NOW + 0.0005) > first


def test_ids_follow_time() -> None:
    """An id minted later sorts after one minted earlier."""
    ids = IdGenerator()
    assert ids.new(NOW) < ids.new(NOW + 0.002) < ids.new(NOW + 3600)


# --- job_to_wire -----------------------------------------------------------------------------


def _job(**overrides: Any) -> Job:
    spec = _spec(
        state_webhook_url="https://example.com/hook",
        state_webhook_secret="whsec_c2VjcmV0LXZhbHVlLXNob3VsZC1uZXZlci1sZWFr",
        metadata={"ticket": 42},
        tags=["gpu"],
    )
    fields: dict[str, Any] = {
        "id": str(ULID.from_timestamp(NOW)),
        "pipeline_id": None,
        "name": "deploy",
        "kind": Kind.EXTERNAL,
        "is_async": False,
        "state": State.FAILED,
        "failure_reason": FailureReason.CALLBACK_FAILURE,
        "exit_code": 3,
        "message": "boom",
        "outputs": {"A": "1"},
        "result_json": '{"x": [1]}',
        "attempt": 1,
        "retry_of": None,
        "created_at": NOW,
        "started_at": NOW + 1,
        "parked_at": None,
        "finished_at": NOW + 2,
        "deadlines": Deadlines(),
        "spec": spec,
        "token_nonce": bytes(range(16)),
    }
    fields.update(overrides)
    return Job(**fields)


def test_job_to_wire_never_carries_a_token_or_secret() -> None:
    """The wire form has no token, nonce or secret, under any key or inside any value."""
    job = _job(state=State.PENDING, failure_reason=None, deadlines=Deadlines(callback=NOW + 9))
    assert job.token_nonce is not None
    token = ContinueTokens("k" * 32).derive(job.id, job.token_nonce)
    wire = job_to_wire(job)
    dumped = json.dumps(wire)
    for key in wire:
        assert "token" not in key
        assert "nonce" not in key
        assert "secret" not in key
    assert token not in dumped
    assert token.split(".")[0] not in dumped
    assert job.token_nonce.hex() not in dumped
    assert base64.b64encode(job.token_nonce).decode() not in dumped
    assert "whsec_" not in dumped
    assert wire["deadline_at"] is not None


def test_job_to_wire_shows_the_documented_fields() -> None:
    """GET /api/v1/jobs/{id} fields: times in RFC 3339 UTC, result as JSON, null deadline."""
    wire = job_to_wire(_job())
    for name in (
        "id",
        "pipeline_id",
        "name",
        "kind",
        "async",
        "state",
        "failure_reason",
        "exit_code",
        "message",
        "outputs",
        "result",
        "attempt",
        "retry_of",
        "created_at",
        "started_at",
        "parked_at",
        "finished_at",
        "deadline_at",
        "artifacts",
    ):
        assert name in wire, name
    assert wire["state"] == "failed"
    assert wire["failure_reason"] == "callback_failure"
    assert wire["result"] == {"x": [1]}
    assert wire["created_at"].endswith("Z")
    assert wire["parked_at"] is None
    assert wire["deadline_at"] is None
    json.dumps(wire)


# --- cursors ---------------------------------------------------------------------------------


def test_cursor_round_trips() -> None:
    """A cursor this server made decodes to the key inside it."""
    cursor = encode_cursor("j:01JD0000000000000000000000")
    assert decode_cursor(cursor, "j:") == "01JD0000000000000000000000"


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "!!!",
        "not a cursor",
        "%%%%",
        "é",
        "\x00",
        "a",
        base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
        encode_cursor("e:12"),
        encode_cursor("x" * 10),
        encode_cursor("j:" + "0" * 100),
        "A" * 10_000,
    ],
)
def test_decode_cursor_rejects_garbage(cursor: str) -> None:
    """Anything this store did not hand out (other prefix, bad base64, too long) is 400."""
    with pytest.raises(MalformedRequest):
        decode_cursor(cursor, "j:")


@pytest.mark.parametrize("key", ["e:abc", "e:-1", "e:" + "9" * 40, "e:1e3", "e:"])
async def test_event_cursor_with_a_non_sequence_key_is_malformed(
    client: httpx.AsyncClient, key: str
) -> None:
    """An event-list cursor must hold a sequence number that fits the database: 400 with the
    error shape, never a 500 from an overflow inside the store."""
    job = await create_job(client)
    response = await client.get(
        f"/api/v1/jobs/{job['id']}/events", params={"cursor": encode_cursor(key)}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "malformed"
