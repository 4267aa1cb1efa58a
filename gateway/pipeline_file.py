"""Pipeline files: a GitLab-like YAML turned into the body of `POST /api/v1/pipelines`.

```yaml
name: provision-cluster          # optional; reserved top-level keys: name, variables,
variables: {REGION: eu-west}     # state_webhook_url; every other top-level key is a job
build:
  script: ["make image"]
provision:
  needs: [build]
  async: true
  callback_timeout: 2h
  script:
    - curl -X POST "$PROVISIONER/requests" -d "{\\"callback\\": \\"$CI_JOB_CONTINUE_URL\\"}"
```

Errors name the file and line (`PipelineFileError`).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from gateway.errors import GatewayError, InvalidField
from gateway.pipelines import check_dag

RESERVED = {"name", "variables", "state_webhook_url"}
_DURATIONS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}
_DURATION_PART = re.compile(r"\s*(\d+)\s*([a-z]+)\s*")
_TIMEOUTS = {
    "timeout": "timeout_s",
    "callback_timeout": "callback_timeout_s",
    "heartbeat_timeout": "heartbeat_timeout_s",
    "queue_timeout": "queue_timeout_s",
}
_PASSTHROUGH = {"async", "tags", "metadata", "continue_on_get", "state_webhook_url"}


class PipelineFileError(GatewayError):
    code = "pipeline_file"


def _where(filename: str, node: yaml.Node) -> str:
    return f"{filename}:{node.start_mark.line + 1}"


def _plain(node: yaml.Node) -> Any:
    """A node as plain Python (the loader's own conversion, with its type resolution)."""
    return yaml.SafeLoader("").construct_object(node, deep=True)


def parse_duration(value: Any) -> int:
    """Seconds from `90`, `"90s"`, `"1h 30m"`, `"2 hours"`; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if not isinstance(value, str):
        raise ValueError("not a duration (say 90, 90s, 15m or 2h)")
    text, position, total = value.strip().lower(), 0, 0
    if text.isdigit():
        if int(text) > 0:
            return int(text)
        raise ValueError(f"{value!r} is not a positive duration")
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            raise ValueError(f"cannot read {value!r} as a duration (say 90s, 15m or 2h)")
        unit = match.group(2)
        seconds = _DURATIONS.get(unit)
        if seconds is None and len(unit) > 3 and unit.endswith("s"):  # plurals: `ms` is no `m`
            seconds = _DURATIONS.get(unit[:-1])
        if seconds is None:
            raise ValueError(f"unknown unit {unit!r} in {value!r}")
        total += int(match.group(1)) * seconds
        position = match.end()
    if total <= 0:
        raise ValueError(f"{value!r} is not a positive duration")
    return total


def load_pipeline(text: str, filename: str = "pipeline.yml") -> dict[str, Any]:
    """The `POST /api/v1/pipelines` body for a pipeline file; PipelineFileError with the line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f"{filename}:{mark.line + 1}" if mark is not None else filename
        raise PipelineFileError(f"{line}: {exc.problem}") from None
    if not isinstance(root, yaml.MappingNode):
        raise PipelineFileError(f"{filename}: a pipeline file is a mapping of jobs")
    body: dict[str, Any] = {"jobs": {}}
    job_nodes: dict[str, yaml.Node] = {}
    for key_node, value_node in root.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise PipelineFileError(f"{_where(filename, key_node)}: a job name is a plain string")
        key = key_node.value
        if key in RESERVED:
            if key in body:
                raise PipelineFileError(f"{_where(filename, key_node)}: `{key}` is given twice")
            body[key] = _plain(value_node)
            continue
        if key in body["jobs"]:
            raise PipelineFileError(f"{_where(filename, key_node)}: job `{key}` is defined twice")
        job_nodes[key] = key_node
        body["jobs"][key] = _job(filename, key, value_node)
    if not body["jobs"]:
        raise PipelineFileError(f"{filename}: the pipeline has no jobs")
    if "name" not in body:
        body["name"] = filename.rsplit("/", 1)[-1].removesuffix(".yml").removesuffix(".yaml")
    try:
        check_dag({name: job.get("needs", []) for name, job in body["jobs"].items()})
    except InvalidField as exc:
        culprit = next((n for n in job_nodes if exc.detail.startswith(f"job `{n}`")), None)
        where = _where(filename, job_nodes[culprit]) if culprit else filename
        raise PipelineFileError(f"{where}: {exc.detail}") from None
    return body


def _job(filename: str, name: str, node: yaml.Node) -> dict[str, Any]:
    if not isinstance(node, yaml.MappingNode):
        raise PipelineFileError(f"{_where(filename, node)}: job `{name}` must be a mapping")
    job: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key, value = key_node.value, _plain(value_node)
        where = _where(filename, key_node)
        if not isinstance(key_node, yaml.ScalarNode):
            raise PipelineFileError(f"{where}: job `{name}` has a key that is not a string")
        if key == "script":
            lines = [value] if isinstance(value, str) else value
            if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
                raise PipelineFileError(f"{where}: `script` is a string or a list of strings")
            job["script"] = lines
        elif key == "needs":
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise PipelineFileError(f"{where}: `needs` is a list of job names")
            job["needs"] = value
        elif key == "external":
            if not isinstance(value, bool):
                raise PipelineFileError(f"{where}: `external` is true or false")
            job["kind"] = "external" if value else "script"
        elif key in _TIMEOUTS:
            try:
                job[_TIMEOUTS[key]] = parse_duration(value)
            except ValueError as exc:
                raise PipelineFileError(f"{where}: `{key}`: {exc}") from None
        elif key == "variables":
            if not isinstance(value, dict):
                raise PipelineFileError(f"{where}: `variables` is a mapping")
            job["variables"] = {
                str(k): v if isinstance(v, dict) else str(v) for k, v in value.items()
            }
        elif key in _PASSTHROUGH:
            job[key] = value
        else:
            raise PipelineFileError(f"{where}: job `{name}` has an unknown key `{key}`")
    job.setdefault("kind", "script")
    if job["kind"] == "script" and "script" not in job:
        raise PipelineFileError(f"{_where(filename, node)}: job `{name}` needs a `script`")
    return job
