"""Pipeline files: a GitLab-like YAML becomes the `POST /api/v1/pipelines` body; every error
names the file and the line."""

from __future__ import annotations

import re
import textwrap
from typing import Any

import msgspec
import pytest

from gateway.models import PipelineSpec
from gateway.pipeline_file import PipelineFileError, load_pipeline, parse_duration

FULL = textwrap.dedent(
    """\
    name: provision-cluster
    variables:
      REGION: eu-west
      API_KEY: {value: s3cret, masked: true}
    state_webhook_url: https://hooks.example.com/ci

    build:
      script: make image
      tags: [docker, linux]
      timeout: 15m
      variables:
        DEBUG: 1
        LEVEL: info
    provision:
      needs: [build]
      async: true
      callback_timeout: 2h
      heartbeat_timeout: 10m
      queue_timeout: 90
      script:
        - echo start
        - curl -X POST "$PROVISIONER" -d "$CI_JOB_CONTINUE_URL"
    approve:
      external: true
      needs: [provision]
      callback_timeout: 1 day
      metadata: {ticket: OPS-1}
      continue_on_get: true
    deploy:
      needs: [provision, approve]
      script: ["./deploy.sh"]
      state_webhook_url: https://hooks.example.com/deploy
    """
)


def error_of(text: str, filename: str = "ci/pipeline.yml") -> str:
    with pytest.raises(PipelineFileError) as caught:
        load_pipeline(text, filename)
    return caught.value.detail


def line_of(detail: str, filename: str = "ci/pipeline.yml") -> int:
    match = re.match(rf"{re.escape(filename)}:(\d+): ", detail)
    assert match, detail
    return int(match.group(1))


# --- a whole file -----------------------------------------------------------------------


def test_full_file_becomes_the_pipeline_body() -> None:
    """Every supported key maps onto the API body: durations in seconds, `external` as the
    kind, a string script as one line, variable values as strings (masked ones kept)."""
    body = load_pipeline(FULL, "ci/pipeline.yml")
    assert body == {
        "name": "provision-cluster",
        "variables": {"REGION": "eu-west", "API_KEY": {"value": "s3cret", "masked": True}},
        "state_webhook_url": "https://hooks.example.com/ci",
        "jobs": {
            "build": {
                "kind": "script",
                "script": ["make image"],
                "tags": ["docker", "linux"],
                "timeout_s": 900,
                "variables": {"DEBUG": "1", "LEVEL": "info"},
            },
            "provision": {
                "kind": "script",
                "needs": ["build"],
                "async": True,
                "callback_timeout_s": 7200,
                "heartbeat_timeout_s": 600,
                "queue_timeout_s": 90,
                "script": ["echo start", 'curl -X POST "$PROVISIONER" -d "$CI_JOB_CONTINUE_URL"'],
            },
            "approve": {
                "kind": "external",
                "needs": ["provision"],
                "callback_timeout_s": 86400,
                "metadata": {"ticket": "OPS-1"},
                "continue_on_get": True,
            },
            "deploy": {
                "kind": "script",
                "needs": ["provision", "approve"],
                "script": ["./deploy.sh"],
                "state_webhook_url": "https://hooks.example.com/deploy",
            },
        },
    }
    assert list(body["jobs"]) == ["build", "provision", "approve", "deploy"]


def test_full_file_body_is_a_valid_api_body() -> None:
    """The body decodes as the API's strict PipelineSpec, and every job passes its checks."""
    spec = msgspec.json.decode(msgspec.json.encode(load_pipeline(FULL)), type=PipelineSpec)
    for job in spec.jobs.values():
        job.check()
    assert spec.jobs["approve"].kind.value == "external"


def test_name_defaults_to_the_file_name() -> None:
    """Without `name`, the pipeline is named after the file, without directory or extension."""
    assert load_pipeline("a: {script: x}\n", "ci/release.yml")["name"] == "release"
    assert load_pipeline("a: {script: x}\n", "nightly.yaml")["name"] == "nightly"


@pytest.mark.parametrize("value", [True, False])
def test_external_flag_sets_the_kind(value: bool) -> None:
    """`external: true` makes an external job (no script needed); `false` a script job."""
    text = f"approve:\n  external: {str(value).lower()}\n  script: [x]\n"
    if value:
        text = "approve:\n  external: true\n"
    assert load_pipeline(text)["jobs"]["approve"]["kind"] == ("external" if value else "script")


@pytest.mark.parametrize("key", ["name", "variables", "state_webhook_url"])
def test_reserved_keys_are_not_jobs(key: str) -> None:
    """The reserved top-level keys go on the pipeline, never become jobs."""
    value = {"name": "n", "variables": "{A: b}", "state_webhook_url": "https://x.test/"}[key]
    body = load_pipeline(f"{key}: {value}\njob: {{script: x}}\n")
    assert list(body["jobs"]) == ["job"]
    assert key in body


def test_other_top_level_keys_are_jobs_whatever_their_name() -> None:
    """Top-level keys other than the reserved ones are jobs, whatever their name."""
    body = load_pipeline("jobs: {script: x}\nscript: {script: y, needs: [jobs]}\n")
    assert body["jobs"] == {
        "jobs": {"kind": "script", "script": ["x"]},
        "script": {"kind": "script", "script": ["y"], "needs": ["jobs"]},
    }


# --- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90),
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("1h", 3600),
        ("1h 30m", 5400),
        ("1h30m", 5400),
        ("2 hours", 7200),
        ("1 hour", 3600),
        ("10 mins", 600),
        ("45 seconds", 45),
        ("3 secs", 3),
        ("1d", 86400),
        ("2 days", 172800),
        (" 5 MIN ", 300),
    ],
)
def test_durations(value: Any, seconds: int) -> None:
    """Integers are seconds; strings are one or more `<n><unit>` parts, summed."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        0,
        -5,
        "0",
        "0s",
        "",
        "   ",
        "1.5h",
        "ten minutes",
        "5 fortnights",
        "5ms",
        "1h and 5m",
        "h",
        True,
        1.5,
        None,
        [90],
    ],
)
def test_bad_durations(value: Any) -> None:
    """Zero, negatives, fractions, unknown units (`ms` is not minutes), words and other types
    are refused."""
    with pytest.raises(ValueError):
        parse_duration(value)


def test_bad_duration_in_a_file_names_key_and_line() -> None:
    """A bad duration is reported at its key's line, naming the key."""
    detail = error_of("build:\n  script: x\n  timeout: 5 parsecs\n")
    assert line_of(detail) == 3
    assert "`timeout`" in detail


# --- errors with file:line ----------------------------------------------------------------


def test_yaml_syntax_error_has_its_line() -> None:
    """A YAML syntax error is reported with the file and the line of the problem."""
    detail = error_of("build:\n  script: [make\ntest:\n  script: x\n  needs: [build\n")
    assert detail.startswith("ci/pipeline.yml:")
    assert line_of(detail) >= 2


def test_tab_indentation_error_has_its_line() -> None:
    """A tab in indentation (a YAML error) is reported at its line."""
    detail = error_of("build:\n  script: x\ntest:\n\tscript: y\n")
    assert line_of(detail) == 4


def test_unknown_key_is_reported_at_its_line() -> None:
    """An unknown job key names the job, the key and its line."""
    detail = error_of("build:\n  script: x\n\ntest:\n  script: y\n  stage: test\n")
    assert line_of(detail) == 6
    assert "`test`" in detail
    assert "`stage`" in detail


def test_job_without_script_is_reported_in_the_job() -> None:
    """A script job without `script` names the job, at a line of that job."""
    detail = error_of("build:\n  script: x\ntest:\n  needs: [build]\n")
    assert line_of(detail) in (3, 4)
    assert "`test`" in detail
    assert "`script`" in detail


def test_unknown_need_points_at_the_needing_job() -> None:
    """An unknown need is reported at the line of the job that lists it."""
    detail = error_of("build:\n  script: x\ntest:\n  script: y\n  needs: [biuld]\n")
    assert line_of(detail) == 3
    assert "`test`" in detail
    assert "`biuld`" in detail


def test_duplicate_need_points_at_the_needing_job() -> None:
    """A need listed twice is reported at the job that lists it, not at the needed job
    (regression: it pointed at the first job named in the message)."""
    detail = error_of("a:\n  script: x\nb:\n  script: y\n  needs: [a, a]\n")
    assert line_of(detail) == 3
    assert "job `b` lists `a` twice" in detail


def test_cycle_points_at_a_job_of_the_cycle() -> None:
    """A cycle is reported at the line of a job in it, and its path is spelled out."""
    text = (
        "root:\n  script: x\na:\n  script: x\n  needs: [root, c]\nb:\n  script: x\n  needs: [a]\n"
    )
    text += "c:\n  script: x\n  needs: [b]\n"
    detail = error_of(text)
    assert line_of(detail) in (3, 6, 9)
    assert "cycle" in detail
    assert "`root`" not in detail


def test_self_need_points_at_the_job() -> None:
    """A job needing itself is reported at its line."""
    detail = error_of("a:\n  script: x\nb:\n  script: y\n  needs: [b]\n")
    assert line_of(detail) == 3
    assert "job `b` needs itself" in detail


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("ok: {script: x}\nbuild: make image\n", 2),
        ("ok: {script: x}\nbuild: [make, image]\n", 2),
        ("ok: {script: x}\nbuild:\n", 2),
    ],
    ids=["string", "list", "empty"],
)
def test_non_mapping_job_is_reported(text: str, line: int) -> None:
    """A job that is not a mapping names the job and its line."""
    detail = error_of(text)
    assert line_of(detail) == line
    assert "job `build` must be a mapping" in detail


def test_duplicate_job_is_reported_at_the_second_definition() -> None:
    """A job defined twice is reported at the line of the second definition."""
    detail = error_of("build:\n  script: x\ntest:\n  script: y\nbuild:\n  script: z\n")
    assert line_of(detail) == 5
    assert "`build` is defined twice" in detail


def test_duplicate_reserved_key_is_reported() -> None:
    """A reserved key given twice is refused at its second line (regression: the first one
    was silently dropped)."""
    detail = error_of("name: one\nbuild: {script: x}\nname: two\n")
    assert line_of(detail) == 3
    assert "`name`" in detail


def test_non_string_job_name_is_reported() -> None:
    """A complex YAML key as a job name is an error with a line (regression: TypeError)."""
    detail = error_of("ok: {script: x}\n? [a, b]\n: {script: x}\n")
    assert line_of(detail) == 2


def test_non_string_job_key_is_reported() -> None:
    """A complex YAML key inside a job is an error with a line (regression: TypeError)."""
    detail = error_of("build:\n  script: x\n  ? [a]\n  : 1\n")
    assert line_of(detail) == 3


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("build:\n  script: {a: 1}\n", 2, "`script`"),
        ("build:\n  script: [1, 2]\n", 2, "`script`"),
        ("build:\n  script: x\n  needs: build0\n", 3, "`needs`"),
        ("build:\n  script: x\n  needs: [{job: a}]\n", 3, "`needs`"),
        ("build:\n  script: x\n  external: yes please\n", 3, "`external`"),
        ("build:\n  script: x\n  variables: [A]\n", 3, "`variables`"),
    ],
)
def test_wrong_types_are_reported_at_their_key(text: str, line: int, words: str) -> None:
    """A key with a value of the wrong type is reported at its line, naming the key."""
    detail = error_of(text)
    assert line_of(detail) == line
    assert words in detail


@pytest.mark.parametrize(
    "text",
    ["", "# nothing\n", "- a\n- b\n", "just text\n", "name: only-a-name\n"],
    ids=["empty", "comment", "list", "scalar", "no-jobs"],
)
def test_files_without_jobs_are_refused(text: str) -> None:
    """A file that is not a mapping, or has no jobs, is refused naming the file."""
    assert error_of(text).startswith("ci/pipeline.yml")
