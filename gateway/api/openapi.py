"""The OpenAPI document: request schemas come from the msgspec Structs the routes decode into."""

from __future__ import annotations

from typing import Any

import msgspec

from gateway import __version__
from gateway.models import ContinueBody, JobSpec
from gateway.states import FailureReason, State

_REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_TIME = _nullable({"type": "string", "format": "date-time"})
_STR = _nullable({"type": "string"})

_WIRE_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {"type": "string", "description": "stable machine code"},
            "detail": {"type": "string"},
            "state": {"type": "string"},
            "failure_reason": _STR,
        },
    },
    "Job": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "ULID"},
            "pipeline_id": _STR,
            "name": {"type": "string"},
            "kind": {"type": "string", "enum": ["external", "script"]},
            "async": {"type": "boolean"},
            "state": {"type": "string", "enum": [s.value for s in State]},
            "failure_reason": _nullable(
                {"type": "string", "enum": [r.value for r in FailureReason]}
            ),
            "exit_code": _nullable({"type": "integer"}),
            "message": _STR,
            "outputs": {"type": "object", "additionalProperties": {"type": "string"}},
            "result": {},
            "attempt": {"type": "integer"},
            "retry_of": _STR,
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": _TIME,
            "parked_at": _TIME,
            "finished_at": _TIME,
            "deadline_at": _TIME,
            "metadata": {},
            "tags": {"type": "array", "items": {"type": "string"}},
            "artifacts": {"type": "array", "items": {"type": "object"}},
            "continue_url": {
                "type": "string",
                "description": "only in the answers to create and retry, for external jobs",
            },
        },
    },
    "JobList": {
        "type": "object",
        "properties": {"items": {"type": "array", "items": _ref("Job")}, "next_cursor": _STR},
    },
    "JobEvent": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "sequence": {"type": "integer"},
            "state": {"type": "string"},
            "previous_state": _STR,
            "failure_reason": _STR,
            "cause": {"type": "string"},
            "at": {"type": "string", "format": "date-time"},
        },
    },
    "JobEventList": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": _ref("JobEvent")},
            "next_cursor": _STR,
        },
    },
    "ContinueResult": {
        "type": "object",
        "properties": {"job_id": {"type": "string"}, "state": {"type": "string"}},
    },
    "ContinueState": {
        "type": "object",
        "properties": {
            "job_id": {"type": "string"},
            "state": {"type": "string"},
            "deadline_at": _TIME,
        },
    },
    "Status": {"type": "object", "properties": {"status": {"type": "string"}}},
}


def _json(schema: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(schema)}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": "error", **_json("Error")} for code in codes}


def _op(
    summary: str,
    ok: tuple[int, str | None],
    errors: tuple[int, ...],
    *,
    body: str | None = None,
    auth: bool = True,
    params: list[dict[str, Any]] | None = None,
    text: bool = False,
) -> dict[str, Any]:
    status, schema = ok
    response: dict[str, Any] = {"description": summary}
    if schema is not None:
        response.update(_json(schema))
    if text:
        response["content"] = {"text/plain": {"schema": {"type": "string"}}}
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {str(status): response, **_errors(*errors)},
        "security": [{"bearer": []}] if auth else [],
    }
    if body is not None:
        op["requestBody"] = {"required": body == "JobSpec", **_json(body)}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


_JOB = [_path_param("job_id")]
_TOKEN = [_path_param("token")]
_PAGE = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
    _query("cursor", {"type": "string"}),
]


def build_openapi() -> dict[str, Any]:
    """The whole document for `/openapi.json`."""
    _, request_schemas = msgspec.json.schema_components([JobSpec, ContinueBody], ref_template=_REF)
    continue_call = _op(
        "Finish the job (the terminal call)",
        (200, "ContinueResult"),
        (400, 404, 409, 413, 422),
        body="ContinueBody",
        auth=False,
        params=[
            *_TOKEN,
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
            },
        ],
    )
    touch = {"post": _op("", (200, "ContinueState"), (404, 409, 413), auth=False, params=_TOKEN)}
    paths: dict[str, Any] = {
        "/api/v1/jobs": {
            "post": _op("Create a job", (201, "Job"), (400, 401, 413, 422), body="JobSpec"),
            "get": _op(
                "List jobs, newest first",
                (200, "JobList"),
                (400, 401),
                params=[
                    _query("state", {"type": "string", "enum": [s.value for s in State]}),
                    _query("pipeline_id", {"type": "string"}),
                    *_PAGE,
                ],
            ),
        },
        "/api/v1/jobs/{job_id}": {"get": _op("Get a job", (200, "Job"), (401, 404), params=_JOB)},
        "/api/v1/jobs/{job_id}/cancel": {
            "post": _op("Cancel a job", (200, "Job"), (401, 404, 409), params=_JOB)
        },
        "/api/v1/jobs/{job_id}/retry": {
            "post": _op("Retry a finished job", (201, "Job"), (401, 404, 409), params=_JOB)
        },
        "/api/v1/jobs/{job_id}/trace": {
            "get": _op(
                "Read the job's trace (masked)",
                (200, None),
                (400, 401, 404),
                params=[*_JOB, _query("offset", {"type": "integer", "minimum": 0})],
                text=True,
            )
        },
        "/api/v1/jobs/{job_id}/events": {
            "get": _op(
                "The job's transition history",
                (200, "JobEventList"),
                (400, 401, 404),
                params=[*_JOB, *_PAGE],
            )
        },
        "/continue/{token}": {
            "post": continue_call,
            "get": _op(
                "Show the job (completes only with continue_on_get)",
                (200, "ContinueState"),
                (404,),
                auth=False,
                params=_TOKEN,
            ),
            "head": _op(
                "Show the job, never completes", (200, None), (404,), auth=False, params=_TOKEN
            ),
        },
        "/continue/{token}/start": _retitle(touch, "Mark an external job running"),
        "/continue/{token}/heartbeat": _retitle(touch, "Push the heartbeat deadline"),
        "/continue/{token}/log": _retitle(touch, "Append text to the job's trace"),
        "/healthz": {"get": _op("Liveness", (200, "Status"), (), auth=False)},
        "/readyz": {
            "get": _op("Readiness (the database answers)", (200, "Status"), (503,), auth=False)
        },
        "/metrics": {"get": _op("Prometheus metrics", (200, None), (401,), auth=False, text=True)},
        "/openapi.json": {"get": _op("This document", (200, None), (), auth=False)},
    }
    paths["/continue/{token}/log"]["post"]["requestBody"] = {
        "content": {"text/plain": {"schema": {"type": "string"}}}
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "gateway", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": {**request_schemas, **_WIRE_SCHEMAS},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _retitle(path_item: dict[str, Any], summary: str) -> dict[str, Any]:
    return {
        "post": {
            **path_item["post"],
            "summary": summary,
            "responses": {
                **path_item["post"]["responses"],
                "200": {**path_item["post"]["responses"]["200"], "description": summary},
            },
        }
    }
