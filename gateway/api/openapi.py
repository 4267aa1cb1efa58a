"""The OpenAPI document: request schemas come from the msgspec Structs the routes decode into."""

from __future__ import annotations

from typing import Any

import msgspec

from gateway import __version__
from gateway.models import ContinueBody, JobSpec, PipelineSpec, RunnerSpec
from gateway.pipelines import PipelineState
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
            "artifacts": {"type": "array", "items": _ref("Artifact")},
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
    "Pipeline": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "state": {"type": "string", "enum": [s.value for s in PipelineState]},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": _TIME,
            "finished_at": _TIME,
            "variables": {"type": "object"},
            "jobs": {"type": "array", "items": _ref("Job")},
        },
    },
    "PipelineList": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": _ref("Pipeline")},
            "next_cursor": _STR,
        },
    },
    "ApiToken": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "scope": {"type": "string", "enum": ["admin", "viewer"]},
            "created_at": {"type": "string", "format": "date-time"},
            "revoked_at": _TIME,
            "token": {"type": "string", "description": "only in the answer to creation"},
        },
    },
    "ApiTokenList": {
        "type": "object",
        "properties": {"items": {"type": "array", "items": _ref("ApiToken")}, "next_cursor": _STR},
    },
    "Runner": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "description": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "run_untagged": {"type": "boolean"},
            "created_at": {"type": "string", "format": "date-time"},
            "last_seen_at": _TIME,
            "running_job_ids": {"type": "array", "items": {"type": "string"}},
            "token": {"type": "string", "description": "only in the answer to registration"},
        },
    },
    "RunnerList": {
        "type": "object",
        "properties": {"items": {"type": "array", "items": _ref("Runner")}, "next_cursor": _STR},
    },
    "HandOut": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "pipeline_id": _STR,
            "attempt": {"type": "integer"},
            "async": {"type": "boolean"},
            "script": {"type": "array", "items": {"type": "string"}},
            "timeout_s": _nullable({"type": "integer"}),
            "token": {"type": "string", "description": "the job token (Job-Token header)"},
            "heartbeat_interval_s": {"type": "integer"},
            "variables": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "key": {"type": "string"},
                        "value": {"type": "string"},
                        "masked": {"type": "boolean"},
                    },
                },
            },
        },
    },
    "Webhook": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "url": {"type": "string"},
            "events": {"type": "array", "items": {"type": "string"}},
            "pipeline_id": _STR,
            "enabled": {"type": "boolean"},
            "disabled_reason": _STR,
            "failing_since": _TIME,
            "failed_deliveries": {"type": "integer"},
            "created_at": {"type": "string", "format": "date-time"},
            "secret": {"type": "string", "description": "only on creation and rotation"},
        },
    },
    "WebhookList": {
        "type": "object",
        "properties": {"items": {"type": "array", "items": _ref("Webhook")}, "next_cursor": _STR},
    },
    "Delivery": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "endpoint_id": {"type": "string"},
            "message_id": {"type": "string", "description": "the webhook-id"},
            "event_type": {"type": "string"},
            "job_id": _STR,
            "state": {"type": "string", "enum": ["pending", "succeeded", "failed", "skipped"]},
            "created_at": {"type": "string", "format": "date-time"},
            "next_attempt_at": _TIME,
            "attempts": {"type": "array", "items": {"type": "object"}},
        },
    },
    "DeliveryList": {
        "type": "object",
        "properties": {"items": {"type": "array", "items": _ref("Delivery")}, "next_cursor": _STR},
    },
    "WebhookEvent": {
        "type": "object",
        "description": "the body of a state webhook, and the data of a stream event",
        "required": ["type", "timestamp", "data"],
        "properties": {
            "type": {"type": "string", "description": "job.<state> or pipeline.<state>"},
            "timestamp": {"type": "string", "format": "date-time"},
            "data": {
                "type": "object",
                "description": "the job or pipeline as GET shows it, with previous_state and"
                " sequence",
                "required": ["previous_state", "sequence"],
            },
        },
    },
    "JobState": {"type": "object", "properties": {"state": {"type": "string"}}},
    "TraceSize": {"type": "object", "properties": {"size": {"type": "integer"}}},
    "Artifact": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
            "content_type": {"type": "string"},
            "size": {"type": "integer"},
            "sha256": {"type": "string", "description": "hex digest of the bytes"},
        },
    },
}


# One event of the stream (OpenAPI 3.1 reads the schema of an event stream per event).
_STREAM_EVENT = {
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {"type": "string", "description": "a global increasing event id (Last-Event-ID)"},
        "event": {"type": "string", "description": "the event type, as in the webhook body"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": _ref("WebhookEvent"),
        },
    },
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
        op["requestBody"] = {"required": body not in _OPTIONAL_BODIES, **_json(body)}
    if params:
        op["parameters"] = params
    return op


# Bodies that may be left out (an empty body reads as `{}`); every other one is required.
_OPTIONAL_BODIES = ("ContinueBody", "RunnerSpec", "JobRequest")
# What `gateway.artifacts.name_problem` accepts (it also refuses `.` and `..`).
_ARTIFACT_NAME = {
    "type": "string",
    "pattern": "^[A-Za-z0-9._-]{1,128}$",
    "description": "not `.` or `..`",
}


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


_JOB = [_path_param("job_id")]
_HOOK = [_path_param("webhook_id")]
_TOKEN = [_path_param("token")]
_PAGE = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
    _query("cursor", {"type": "string"}),
]


def build_openapi() -> dict[str, Any]:
    """The whole document for `/openapi.json`."""
    from gateway.api.runner import JobRequest, JobUpdate
    from gateway.api.tokens import TokenSpec
    from gateway.models import EndpointPatch, EndpointSpec

    _, request_schemas = msgspec.json.schema_components(
        [
            JobSpec,
            ContinueBody,
            PipelineSpec,
            RunnerSpec,
            JobRequest,
            JobUpdate,
            EndpointSpec,
            EndpointPatch,
            TokenSpec,
        ],
        ref_template=_REF,
    )
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
        "/api/v1/pipelines": {
            "post": _op(
                "Create a pipeline (a DAG of jobs)",
                (201, "Pipeline"),
                (400, 401, 413, 422),
                body="PipelineSpec",
            ),
            "get": _op(
                "List pipelines, newest first",
                (200, "PipelineList"),
                (400, 401),
                params=[
                    _query("state", {"type": "string", "enum": [s.value for s in PipelineState]}),
                    *_PAGE,
                ],
            ),
        },
        "/api/v1/pipelines/{pipeline_id}": {
            "get": _op(
                "Get a pipeline with the latest attempt of each job",
                (200, "Pipeline"),
                (401, 404),
                params=[_path_param("pipeline_id")],
            )
        },
        "/api/v1/pipelines/{pipeline_id}/cancel": {
            "post": _op(
                "Cancel a pipeline and its unfinished jobs",
                (200, "Pipeline"),
                (401, 404, 409),
                params=[_path_param("pipeline_id")],
            )
        },
        "/api/v1/runners": {
            "post": _op(
                "Register a runner (its token is shown only here)",
                (201, "Runner"),
                (400, 401, 413, 422),
                body="RunnerSpec",
            ),
            "get": _op("List runners", (200, "RunnerList"), (400, 401), params=_PAGE),
        },
        "/api/v1/runners/{runner_id}": {
            "delete": _op(
                "Revoke a runner", (204, None), (401, 404), params=[_path_param("runner_id")]
            )
        },
        "/api/v1/runner/jobs/request": {
            "post": _runner_op(
                "Long poll for a job (runner token)",
                (201, "HandOut"),
                (400, 401, 422),
                body="JobRequest",
                no_job=True,
            )
        },
        "/api/v1/runner/jobs/{job_id}": {
            "put": _runner_op(
                "Confirm, keep alive, or report the exit (Job-Token)",
                (200, "JobState"),
                (400, 401, 403, 409, 422),
                body="JobUpdate",
                params=_JOB,
                job_token=True,
            )
        },
        "/api/v1/runner/jobs/{job_id}/trace": {
            "patch": _runner_op(
                "Append to the trace (Job-Token, Content-Range)",
                (202, "TraceSize"),
                (400, 401, 403, 409, 413, 416),
                params=[
                    *_JOB,
                    _header("Content-Range", "^(bytes )?[0-9]{1,15}-[0-9]{1,15}$"),
                ],
                job_token=True,
            )
        },
        "/api/v1/webhooks": {
            "post": _op(
                "Subscribe an endpoint (its secret is shown only here)",
                (201, "Webhook"),
                (400, 401, 413, 422),
                body="EndpointSpec",
            ),
            "get": _op("List webhook endpoints", (200, "WebhookList"), (400, 401), params=_PAGE),
        },
        "/api/v1/webhooks/{webhook_id}": {
            "get": _op("Get an endpoint", (200, "Webhook"), (401, 404), params=_HOOK),
            "patch": _op(
                "Change url, events or enabled",
                (200, "Webhook"),
                (400, 401, 404, 422),
                body="EndpointPatch",
                params=_HOOK,
            ),
            "delete": _op(
                "Delete an endpoint (its pending deliveries are skipped)",
                (204, None),
                (401, 404),
                params=_HOOK,
            ),
        },
        "/api/v1/webhooks/{webhook_id}/rotate-secret": {
            "post": _op(
                "A new secret (the old one signs beside it for 24 h)",
                (200, "Webhook"),
                (401, 404),
                params=_HOOK,
            )
        },
        "/api/v1/webhooks/{webhook_id}/deliveries": {
            "get": _op(
                "The endpoint's deliveries, newest first",
                (200, "DeliveryList"),
                (400, 401, 404),
                params=[*_HOOK, *_PAGE],
            )
        },
        "/api/v1/jobs/{job_id}/deliveries": {
            "get": _op(
                "The job's webhook deliveries, newest first",
                (200, "DeliveryList"),
                (400, 401, 404),
                params=[*_JOB, *_PAGE],
            )
        },
        "/api/v1/deliveries/{delivery_id}/redeliver": {
            "post": _op(
                "Send the same event again (same webhook-id)",
                (202, "Delivery"),
                (401, 404, 409),
                params=[_path_param("delivery_id")],
            )
        },
        "/api/v1/events/stream": {
            "get": _op(
                "Every job and pipeline event, live (Server-Sent Events)",
                (200, None),
                (400, 401),
                params=[
                    _query("pipeline_id", {"type": "string"}),
                    _query("job_id", {"type": "string"}),
                    _query("last_event_id", {"type": "integer", "minimum": 0}),
                ],
                text=True,
            )
        },
        "/api/v1/tokens": {
            "post": _op(
                "Create an API token, admin or viewer (admin only; shown only here)",
                (201, "ApiToken"),
                (400, 401, 403, 409, 413, 422),
                body="TokenSpec",
            ),
            "get": _op(
                "List API tokens, revoked ones included (admin only)",
                (200, "ApiTokenList"),
                (400, 401, 403),
                params=_PAGE,
            ),
        },
        "/api/v1/tokens/{token_id}": {
            "delete": _op(
                "Revoke an API token and end its dashboard sessions (admin only)",
                (204, None),
                (401, 403, 404, 409),
                params=[_path_param("token_id")],
            )
        },
        "/healthz": {"get": _op("Liveness", (200, "Status"), (), auth=False)},
        "/readyz": {
            "get": _op("Readiness (the database answers)", (200, "Status"), (503,), auth=False)
        },
        "/metrics": {"get": _op("Prometheus metrics", (200, None), (401,), auth=False, text=True)},
        "/openapi.json": {"get": _op("This document", (200, None), (), auth=False)},
    }
    _add_scopes(paths)
    paths["/continue/{token}/log"]["post"]["requestBody"] = {
        "content": {"text/plain": {"schema": {"type": "string"}}}
    }
    paths["/api/v1/runner/jobs/{job_id}/trace"]["patch"]["requestBody"] = {
        "required": True,
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    paths["/api/v1/events/stream"]["get"]["responses"]["200"]["content"] = {
        "text/event-stream": {"schema": _STREAM_EVENT}
    }
    paths.update(_artifact_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "gateway", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": {**request_schemas, **_WIRE_SCHEMAS},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "runner": {"type": "http", "scheme": "bearer", "description": "a runner token"},
                "job": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Job-Token",
                    "description": "the job token of a hand-out, valid while the job is handed"
                    " out or running",
                },
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "gateway_session",
                    "description": "the dashboard's session; unsafe methods also need the"
                    " session's CSRF token in `X-CSRF-Token`",
                },
            },
        },
    }


_BYTES = {"content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}}


def _artifact_paths() -> dict[str, Any]:
    """Uploads (the body is the artifact, its `Content-Type` kept) and downloads."""
    name = [{**_path_param("name"), "schema": _ARTIFACT_NAME}]
    by_continue = _op(
        "Upload an artifact (a heartbeat; replaces one of the same name)",
        (201, "Artifact"),
        (404, 409, 413, 422),
        auth=False,
        params=[*_TOKEN, *name],
    )
    by_runner = _runner_op(
        "Upload an artifact while the job runs (Job-Token)",
        (201, "Artifact"),
        (401, 403, 409, 413, 422),
        params=[*_JOB, *name],
        job_token=True,
    )
    download = _op(
        "Download an artifact (an attachment with its content type)",
        (200, None),
        (401, 404),
        params=[*_JOB, *name],
    )
    by_link = _op(
        "Download an artifact through the signed link of a terminal event (no other"
        " credential; 410 once expired)",
        (200, None),
        (404, 410),
        auth=False,
        params=[_path_param("signed")],
    )
    for op in (by_continue, by_runner):
        op["requestBody"] = {"required": True, **_BYTES}
    for op in (download, by_link):
        op["responses"]["200"].update(_BYTES)
    return {
        "/continue/{token}/artifacts/{name}": {"put": by_continue},
        "/api/v1/runner/jobs/{job_id}/artifacts/{name}": {"put": by_runner},
        "/api/v1/jobs/{job_id}/artifacts/{name}": {"get": download},
        "/artifacts/{signed}": {"get": by_link},
    }


def _add_scopes(paths: dict[str, Any]) -> None:
    """Every API-token operation also takes the dashboard's session; every write among them
    answers 403 to a viewer token (and to a session request without its CSRF token)."""
    for item in paths.values():
        for method, operation in item.items():
            if operation.get("security") != [{"bearer": []}]:
                continue
            operation["security"] = [{"bearer": []}, {"session": []}]
            if method in ("post", "put", "patch", "delete"):
                operation["responses"].setdefault(
                    "403",
                    {
                        "description": "a viewer token, or a session without its CSRF token",
                        **_json("Error"),
                    },
                )


def _header(name: str, pattern: str | None = None) -> dict[str, Any]:
    schema = {"type": "string"} if pattern is None else {"type": "string", "pattern": pattern}
    return {"name": name, "in": "header", "required": True, "schema": schema}


def _runner_op(
    summary: str,
    ok: tuple[int, str | None],
    errors: tuple[int, ...],
    *,
    body: str | None = None,
    params: list[dict[str, Any]] | None = None,
    job_token: bool = False,
    no_job: bool = False,
) -> dict[str, Any]:
    """A runner route: its answers carry `Job-Status`; it takes a runner token, or the job's
    token (`job_token`) on the routes about one job."""
    op = _op(summary, ok, errors, body=body, params=params)
    op["security"] = [{"job": []}] if job_token else [{"runner": []}]
    if no_job:
        op["responses"]["204"] = {"description": "no job came within `wait_s`"}
    op["responses"][str(ok[0])]["headers"] = {
        "Job-Status": {"schema": {"type": "string"}, "description": "the job's state"}
    }
    return op


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
