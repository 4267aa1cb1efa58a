"""`run_script`: a real bash script in its own process group, its output, exit code and kills."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.runner import READ_SIZE, ScriptResult, run_script

ENV = {"PATH": os.environ["PATH"]}
DEADLINE_S = 10.0


def live_members(pgid: int) -> list[int]:
    """Pids of the group's processes that are not dead (zombies awaiting a reaper are dead)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


async def wait_group_gone(pgid: int) -> None:
    """Poll /proc until no live process of the group remains, or fail at the deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while members := live_members(pgid):
        assert time.monotonic() < deadline, f"group {pgid} still has {members}"
        await asyncio.sleep(0.02)


class Output:
    """Collects output chunks and sets `seen` (the event given, or its own) once `marker` has
    appeared."""

    def __init__(self, marker: bytes = b"\0", seen: asyncio.Event | None = None) -> None:
        self.chunks: list[bytes] = []
        self.marker = marker
        self.seen = seen or asyncio.Event()

    def __call__(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        if self.marker in self.data:
            self.seen.set()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def number(self, name: str) -> int:
        found = re.search(rf"{name}=(\d+)".encode(), self.data)
        assert found is not None, self.data
        return int(found.group(1))


async def run(script: list[str], **kwargs: Any) -> tuple[ScriptResult, Output]:
    output = Output()
    result = await run_script(script, env=ENV, on_output=output, **kwargs)
    return result, output


async def test_success_exit_code_and_merged_output() -> None:
    """A script that succeeds exits 0; stdout and stderr arrive merged, in order."""
    result, output = await run(["echo out", "echo err >&2", "echo again"])
    assert result == ScriptResult(exit_code=0)
    assert output.data == b"out\nerr\nagain\n"


async def test_exit_code_is_reported() -> None:
    """The script's own exit code is the result's."""
    result, output = await run(["echo before", "exit 7", "echo never"])
    assert result.exit_code == 7 and not result.timed_out and not result.killed
    assert output.data == b"before\n"


async def test_errexit_stops_at_the_first_failing_command() -> None:
    """`set -e`: a failing command ends the script with its code."""
    result, output = await run(["echo one", "false", "echo two"])
    assert result.exit_code == 1
    assert output.data == b"one\n"


async def test_pipefail_fails_a_pipe_whose_first_stage_fails() -> None:
    """`set -o pipefail`: `false | true` fails the script."""
    result, output = await run(["false | true", "echo after"])
    assert result.exit_code == 1
    assert output.data == b""


async def test_environment_is_exactly_what_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script sees the given environment (and nothing of the caller's) in `cwd`."""
    monkeypatch.setenv("GATEWAY_TEST_LEAK", "leaked")
    result, output = await run(['echo "$JOB_VAR|${GATEWAY_TEST_LEAK:-unset}|$PWD"'], cwd=tmp_path)
    assert result.exit_code == 0
    assert output.data == f"|unset|{tmp_path}\n".encode()
    output = Output()
    await run_script(["echo $JOB_VAR"], env={**ENV, "JOB_VAR": "v a l"}, on_output=output)
    assert output.data == b"v a l\n"


async def test_large_output_arrives_in_bounded_chunks() -> None:
    """300 KB of output arrive complete, in chunks of at most READ_SIZE bytes."""
    result, output = await run(["head -c 300000 /dev/zero | tr '\\0' x"])
    assert result.exit_code == 0
    assert output.data == b"x" * 300_000
    assert max(len(chunk) for chunk in output.chunks) <= READ_SIZE


async def test_a_script_longer_than_an_argument_can_be_runs() -> None:
    """A script over the 128 KiB single-argument limit still runs (it goes through a file)."""
    lines = [f": {'x' * 100}" for _ in range(2000)] + ["echo done"]
    result, output = await run(lines)
    assert result.exit_code == 0 and output.data == b"done\n"


async def test_kill_stops_the_whole_process_group() -> None:
    """Setting `kill` ends the script and its background child: no process of the group remains."""
    kill = asyncio.Event()
    output = Output(marker=b"child=", seen=kill)
    started = time.monotonic()
    result = await run_script(
        ["sleep 60 &", 'echo "pgid=$$ child=$!"', "wait"],
        env=ENV,
        on_output=output,
        kill=kill,
        kill_grace_s=5.0,
    )
    assert result.killed and not result.timed_out
    assert result.exit_code == 128 + 15
    assert time.monotonic() - started < DEADLINE_S
    await wait_group_gone(output.number("pgid"))


async def test_kill_escalates_to_sigkill_when_sigterm_is_ignored() -> None:
    """A group that ignores SIGTERM is SIGKILLed after the grace period."""
    kill = asyncio.Event()
    output = Output(marker=b"ready", seen=kill)
    result = await run_script(
        ["trap '' TERM", "sleep 60 &", 'echo "ready pgid=$$"', "wait"],
        env=ENV,
        on_output=output,
        kill=kill,
        kill_grace_s=0.2,
    )
    assert result.killed and result.exit_code == 128 + 9
    await wait_group_gone(output.number("pgid"))


async def test_timeout_kills_the_group_and_says_so() -> None:
    """Past `timeout_s` the script and its children are killed and the result is timed out."""
    started = time.monotonic()
    result, output = await run(
        ['echo "pgid=$$"', "sleep 60 &", "sleep 60"], timeout_s=0.3, kill_grace_s=5.0
    )
    assert result.timed_out and not result.killed
    assert result.exit_code in (128 + 15, 128 + 9)
    assert time.monotonic() - started < DEADLINE_S
    await wait_group_gone(output.number("pgid"))


async def test_background_leftovers_are_killed_when_the_script_ends() -> None:
    """A background process the script left behind is killed and does not hold the output open."""
    started = time.monotonic()
    result, output = await run(['echo "pgid=$$"', "sleep 60 &", "echo done"])
    assert result == ScriptResult(exit_code=0)
    assert output.data.endswith(b"done\n")
    assert time.monotonic() - started < DEADLINE_S
    await wait_group_gone(output.number("pgid"))


async def test_cancelling_the_runner_task_kills_the_group() -> None:
    """Cancelling `run_script` itself (runner shutdown) leaves no process behind."""
    output = Output(marker=b"pgid=")
    task = asyncio.create_task(
        run_script(["sleep 60 &", 'echo "pgid=$$"', "wait"], env=ENV, on_output=output)
    )
    await asyncio.wait_for(output.seen.wait(), timeout=DEADLINE_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_group_gone(output.number("pgid"))
