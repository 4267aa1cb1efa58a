"""The runner's pure parts: streaming masker, trace offsets, backoff, job payload, CLI parsing."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cli import _parser
from gateway.masking import MASK, Masker, mask_all
from gateway.runner import (
    Backoff,
    JobPayload,
    TraceLog,
    _register_command,
    _run_command,
    backoff_delay,
    parse_range_size,
    retry_after_s,
    script_text,
)

SECRET = "s3cr3t-Value!"


def small_bytes(alphabet: str, min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    """Byte strings over a tiny alphabet, so secrets and output collide often."""
    letters = st.text(alphabet=alphabet, min_size=min_size, max_size=max_size)
    return letters.map(str.encode)


def stream(secrets: Sequence[str | bytes], chunks: Sequence[bytes]) -> bytes:
    """Feed `chunks` through a fresh masker, checking the held tail stays bounded."""
    masker = Masker(secrets)
    longest = max((len(s.encode() if isinstance(s, str) else s) for s in secrets), default=1)
    out = []
    for chunk in chunks:
        out.append(masker.feed(chunk))
        assert masker.held <= max(longest - 1, 0)
    out.append(masker.flush())
    return b"".join(out)


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- masker --


def test_secret_split_at_every_position_is_masked() -> None:
    """A secret cut into two chunks at any byte never reaches the output."""
    data = f"before {SECRET} after\n".encode()
    for cut in range(len(data) + 1):
        out = stream([SECRET], split_at(data, [cut]))
        assert out == b"before " + MASK + b" after\n", cut


def test_secret_split_into_three_chunks_anywhere_is_masked() -> None:
    """Every pair of cuts (three chunks) still masks the secret."""
    data = f"x{SECRET}y".encode()
    for first in range(len(data) + 1):
        for second in range(first, len(data) + 1):
            assert stream([SECRET], split_at(data, [first, second])) == b"x" + MASK + b"y"


def test_secret_fed_byte_by_byte_is_masked() -> None:
    """One byte per chunk is the worst case for carry-over and still masks."""
    data = f"{SECRET}{SECRET} and {SECRET}".encode()
    out = stream([SECRET], [data[i : i + 1] for i in range(len(data))])
    assert out == MASK + b" and " + MASK


def test_output_unrelated_to_secrets_is_not_held_back() -> None:
    """Only a tail that could start a secret waits; other output is sent at once."""
    masker = Masker([SECRET])
    assert masker.feed(b"building...\n") == b"building...\n"
    assert masker.feed(b"value s3c") == b"value "
    assert masker.held == 3
    assert masker.feed(b"ond\n") == b"s3cond\n"


def test_overlapping_secrets_hide_every_byte_of_both() -> None:
    """Where two secrets overlap, neither leaks a byte: the covered run becomes one mask."""
    assert stream(["abcd", "cdef"], [b"xxabcdefyy"]) == b"xx" + MASK + b"yy"
    for cut in range(11):
        assert stream(["abcd", "cdef"], split_at(b"xxabcdefyy", [cut])) == b"xx" + MASK + b"yy"


def test_secret_inside_another_is_masked_once() -> None:
    """A secret that contains another is masked whole, in one mask."""
    assert stream(["token", "my-token-value"], [b"a my-token-value b token"]) == (
        b"a " + MASK + b" b " + MASK
    )


def test_self_overlapping_secret_is_fully_hidden() -> None:
    """`aa` in `aaaaa`: every byte is hidden, however the stream is cut."""
    for cut in range(6):
        assert stream(["aa"], split_at(b"-aaaaa-", [cut])) == b"-" + MASK + b"-"


def test_multibyte_secret_split_inside_a_character() -> None:
    """Masking works on bytes: a cut inside a UTF-8 character does not matter."""
    secret = "pässwörd"
    data = f"[{secret}]".encode()
    for cut in range(len(data) + 1):
        assert stream([secret], split_at(data, [cut])) == b"[" + MASK + b"]"


def test_no_or_empty_secrets_pass_output_through() -> None:
    """Without (non-empty) secrets nothing is held or changed."""
    for secrets in ([], [""]):
        masker = Masker(secrets)
        assert masker.feed(b"abc") == b"abc"
        assert masker.held == 0
        assert masker.flush() == b""


@settings(max_examples=300, deadline=None)
@given(
    secrets=st.lists(small_bytes("abc", 1, 5), min_size=1, max_size=3),
    data=small_bytes("abcx", 0, 40),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6),
)
def test_streaming_equals_one_shot_masking(
    secrets: list[bytes], data: bytes, cuts: list[int]
) -> None:
    """However the stream is chunked, the output equals masking the whole stream at once."""
    chunks = split_at(data, [min(c, len(data)) for c in cuts])
    assert stream(secrets, chunks) == mask_all(data, secrets)


@settings(max_examples=200, deadline=None)
@given(
    secrets=st.lists(small_bytes("ab", 1, 6), min_size=1, max_size=3),
    data=small_bytes("ab", 0, 30),
)
def test_one_shot_masking_leaves_no_secret(secrets: list[bytes], data: bytes) -> None:
    """The masked output contains no byte of any occurrence: removing masks leaves no secret."""
    masked = mask_all(data, secrets, mask=b"|")
    for piece in masked.split(b"|"):
        for secret in secrets:
            assert secret not in piece


# --- trace log --


def test_patches_are_contiguous_and_bounded() -> None:
    """Patches cover the trace in order, each at most max_bytes, with inclusive ranges."""
    log = TraceLog()
    log.append(b"x" * 150_000)
    ranges = []
    while (patch := log.next_patch(64 * 1024)) is not None:
        assert 0 < len(patch.body) <= 64 * 1024
        ranges.append(patch.content_range)
        log.acknowledge(patch.end + 1)
    assert ranges == ["0-65535", "65536-131071", "131072-149999"]
    assert log.pending == 0 and log.sent == 150_000


def test_416_behind_resends_from_the_servers_size() -> None:
    """A gap (the server has less than we thought) resumes from the server's size."""
    log = TraceLog()
    log.append(b"0123456789")
    log.acknowledge(10)
    log.append(b"abcdef")
    log.acknowledge(4)  # 416 with Range: 0-4
    patch = log.next_patch()
    assert patch is not None
    assert (patch.start, patch.body, patch.content_range) == (4, b"456789abcdef", "4-15")


def test_416_ahead_skips_what_the_server_already_has() -> None:
    """An overlap (a patch applied whose answer was lost) skips the bytes already held."""
    log = TraceLog()
    log.append(b"0123456789")
    first = log.next_patch()
    assert first is not None and first.content_range == "0-9"
    log.append(b"abc")
    log.acknowledge(10)  # the retry of 0-9 got 416 with Range: 0-10
    patch = log.next_patch()
    assert patch is not None and (patch.start, patch.body) == (10, b"abc")


def test_server_size_beyond_the_trace_rebases_unsent_bytes() -> None:
    """A server size past what was produced places the unsent bytes at the server's end."""
    log = TraceLog()
    log.append(b"abcdef")
    log.acknowledge(2)
    log.acknowledge(100)
    patch = log.next_patch()
    assert patch is not None and (patch.start, patch.body) == (100, b"cdef")
    log.acknowledge(104)
    assert log.pending == 0


def test_trace_past_the_limit_is_truncated_with_a_notice() -> None:
    """Output beyond the limit is dropped after a one-time notice."""
    log = TraceLog(limit_bytes=10)
    log.append(b"0123456")
    log.append(b"789abc")
    log.append(b"more")
    patch = log.next_patch()
    assert patch is not None
    assert patch.body == b"0123456789\n[runner: trace truncated at 10 bytes]\n"
    assert log.truncated


def test_negative_server_size_is_refused() -> None:
    """A negative size is a protocol error, not a resume point."""
    with pytest.raises(ValueError):
        TraceLog().acknowledge(-1)


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("0-42", 42),
        ("0-0", 0),
        ("bytes 0-7", 7),
        ("bytes=0-7", 7),
        (" 0-9 ", 9),
        (None, None),
        ("", None),
        ("42", None),
        ("0-x", None),
        ("0-٣", None),
        ("-5", None),
    ],
)
def test_range_header_parsing(header: str | None, size: int | None) -> None:
    """The server's size is read from `Range: 0-<size>`; anything else is unknown."""
    assert parse_range_size(header) == size


# --- backoff --


def test_backoff_grows_then_caps_within_jitter_bounds() -> None:
    """Delays double from the base, never exceed the cap, never drop below (1 - jitter)."""
    for attempt in range(200):
        ceiling = min(60.0, 1.0 * 2.0**attempt) if attempt < 64 else 60.0
        for rand in (0.0, 0.3, 1.0):
            delay = backoff_delay(attempt, base_s=1.0, cap_s=60.0, jitter=0.5, rand=rand)
            assert ceiling * 0.5 <= delay <= ceiling
    assert backoff_delay(0, rand=1.0) == 1.0
    assert backoff_delay(3, rand=1.0) == 8.0
    assert backoff_delay(10_000, rand=0.0) == 30.0


def test_backoff_sequence_is_jittered_and_resets() -> None:
    """Backoff draws its jitter from the injected rng and starts over after reset."""
    backoff = Backoff(base_s=0.5, cap_s=4.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    for attempt, delay in enumerate(delays):
        ceiling = min(4.0, 0.5 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)
    backoff.reset()
    assert backoff.next_delay() <= 0.5


@pytest.mark.parametrize(
    "kwargs", [{"attempt": -1}, {"attempt": 0, "jitter": 1.5}, {"attempt": 0, "rand": 2.0}]
)
def test_backoff_refuses_out_of_range_arguments(kwargs: dict[str, float]) -> None:
    """Negative attempts and jitter or rand outside [0, 1] are errors."""
    attempt = int(kwargs.pop("attempt"))
    with pytest.raises(ValueError):
        backoff_delay(attempt, **kwargs)


def test_retry_after_seconds_only() -> None:
    """Retry-After in seconds is honoured; dates and junk are ignored."""
    assert retry_after_s("7") == 7.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert retry_after_s(None) is None


# --- job payload --


def hand_out(**fields: object) -> dict[str, object]:
    body: dict[str, object] = {
        "id": "01JOB",
        "name": "build",
        "pipeline_id": "01PIPE",
        "attempt": 2,
        "async": True,
        "script": ["echo hi"],
        "timeout_s": 30,
        "token": "job-token-secret",
        "heartbeat_interval_s": 10,
        "variables": [
            {"key": "PLAIN", "value": "p", "masked": False},
            {"key": "CI_JOB_CONTINUE_URL", "value": "http://gw/continue/tok", "masked": True},
            {"key": "bad-name", "value": "x", "masked": False},
            {"key": "PATH", "value": "/job/bin", "masked": False},
        ],
    }
    body.update(fields)
    return body


def test_job_payload_reads_the_hand_out() -> None:
    """Every hand-out field is read; masked values are listed for the masker."""
    job = JobPayload.from_json(hand_out())
    assert (job.id, job.name, job.pipeline_id, job.attempt) == ("01JOB", "build", "01PIPE", 2)
    assert job.is_async and job.script == ("echo hi",)
    assert (job.timeout_s, job.heartbeat_interval_s) == (30.0, 10.0)
    assert job.masked_values == ["http://gw/continue/tok"]
    assert "job-token-secret" not in repr(job) and "continue/tok" not in repr(job)


def test_job_environment_inherits_path_and_home_and_job_variables_win() -> None:
    """The script sees PATH/HOME from the runner, then the job's variables (which win)."""
    job = JobPayload.from_json(hand_out())
    env, skipped = job.environment({"PATH": "/usr/bin", "HOME": "/home/r", "SECRET_OF_RUNNER": "x"})
    assert env == {
        "PATH": "/job/bin",
        "HOME": "/home/r",
        "PLAIN": "p",
        "CI_JOB_CONTINUE_URL": "http://gw/continue/tok",
    }
    assert skipped == ["bad-name"]


def test_job_payload_defaults_and_refusals() -> None:
    """Missing optional fields get defaults; a hand-out without id or token is refused."""
    job = JobPayload.from_json({"id": "j", "token": "t"})
    assert job.timeout_s is None and job.heartbeat_interval_s == 30.0 and job.script == ()
    for body in ({"id": "j"}, {"token": "t"}, [], {"id": "j", "token": "t", "script": "ls"}):
        with pytest.raises(ValueError):
            JobPayload.from_json(body)


def test_script_text_starts_with_errexit_and_pipefail() -> None:
    """The bash program stops at the first failing command or pipe stage."""
    assert script_text(["a", "b"]) == "set -eo pipefail\na\nb\n"


# --- command line --


def test_cli_runner_runs_with_options_and_no_subcommand() -> None:
    """`gateway runner --url --token --tags --concurrency` parses to the run command."""
    args = _parser().parse_args(
        ["runner", "--url", "http://gw", "--token", "rt", "--tags", "a, b,", "--concurrency", "3"]
    )
    assert args.run is _run_command
    assert (args.url, args.token, args.tags, args.concurrency) == ("http://gw", "rt", "a, b,", 3)


def test_cli_runner_register_parses_its_own_options() -> None:
    """`gateway runner register ... --no-run-untagged` parses to the register command."""
    argv = "runner register --url http://gw --token api --tags gpu --description box"
    args = _parser().parse_args([*argv.split(), "--no-run-untagged"])
    assert args.run is _register_command
    assert (args.url, args.token, args.tags, args.description) == ("http://gw", "api", "gpu", "box")
    assert args.run_untagged is False
    assert _parser().parse_args(["runner", "register"]).run_untagged is True
