"""`gateway pipeline run`: the pure parts (change lines, durations, the rich table) and the
refusals that happen before any gateway is contacted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from gateway.cli import main
from gateway.clock import rfc3339
from gateway.pipeline_cli import Snapshot, change_lines, format_duration, progress_table

T0 = 1_700_000_000.0


def stamp(seconds: float) -> str:
    value = rfc3339(T0 + seconds)
    assert value is not None
    return value


def snapshot(state: str, *jobs: dict[str, Any]) -> Snapshot:
    return Snapshot.from_json(
        {"id": "P1", "name": "demo", "state": state, "created_at": stamp(0), "jobs": list(jobs)}
    )


def job(name: str, state: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "state": state, "attempt": 1, **fields}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-3, "0.0s"), (0.04, "0.0s"), (4.26, "4.3s"), (59.9, "59.9s"), (65, "1m05s"), (7380, "2h03m")],
)
def test_format_duration(seconds: float, text: str) -> None:
    """Durations read as seconds, then minutes and seconds, then hours and minutes."""
    assert format_duration(seconds) == text


def test_the_first_snapshot_lists_every_job_then_the_pipeline() -> None:
    """With nothing seen before, every job gets a line, then the pipeline's state."""
    first = snapshot("pending", job("build", "pending"), job("deploy", "created"))
    assert change_lines(None, first, T0) == [
        "job build: pending",
        "job deploy: created",
        "pipeline P1: pending",
    ]


def test_only_changes_are_printed() -> None:
    """A job whose state and attempt did not move prints nothing; a finished job says how it
    ended and after how long; a new attempt is named."""
    before = snapshot("running", job("build", "running"), job("deploy", "created"))
    after = snapshot(
        "running",
        job(
            "build",
            "failed",
            attempt=1,
            failure_reason="script_failure",
            started_at=stamp(1),
            finished_at=stamp(3.5),
        ),
        job("deploy", "created"),
    )
    assert change_lines(before, after, T0 + 4) == ["job build: failed [script_failure] after 2.5s"]
    retried = snapshot("running", job("build", "failed", attempt=2), job("deploy", "created"))
    assert change_lines(after, retried, T0 + 5) == ["job build: failed (attempt 2)"]
    ended = snapshot("failed", job("build", "failed", attempt=2), job("deploy", "created"))
    assert change_lines(retried, ended, T0 + 6) == ["pipeline P1: failed"]


def test_the_table_shows_states_as_words_with_attempt_duration_and_due_callback() -> None:
    """The live view names every job's state as a word (readable without color), its attempt,
    its duration, and when a parked job's callback is due."""
    view = snapshot(
        "waiting",
        job("build", "success", started_at=stamp(0), finished_at=stamp(2)),
        job("provision", "waiting", attempt=2, started_at=stamp(2), deadline_at=stamp(610)),
        job("deploy", "created"),
    )
    console = Console(record=True, width=120, color_system=None)
    console.print(progress_table(view, T0 + 10))
    text = console.export_text()
    assert "pipeline demo (P1): ⏸ waiting" in text
    lines = {line.split()[1]: line for line in text.splitlines() if line.startswith("│")}
    assert "✔ success" in lines["build"]
    assert "2.0s" in lines["build"]
    assert "⏸ waiting" in lines["provision"]
    assert "│       2 │" in lines["provision"]
    assert "8.0s" in lines["provision"]
    assert "callback due in 10m00s" in lines["provision"]
    assert "○ created" in lines["deploy"]


def test_a_yaml_error_names_file_and_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken pipeline file is refused with its file:line and exit code 2, before any
    gateway is contacted."""
    path = tmp_path / "bad.yml"
    path.write_text("build:\n  script: [make]\n  neds: [x]\n")
    code = main(["pipeline", "run", str(path), "--url", "http://127.0.0.1:9", "--token", "t"])
    assert code == 2
    assert f"{path}:3" in capsys.readouterr().err


def test_yaml_syntax_error_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A YAML syntax error is reported with its line and exit code 2."""
    path = tmp_path / "broken.yml"
    path.write_text("build:\n  script: [make\n  needs: x\n")
    code = main(["pipeline", "run", str(path), "--url", "http://127.0.0.1:9", "--token", "t"])
    assert code == 2
    assert f"{path}:" in capsys.readouterr().err


def test_a_missing_file_or_bad_var_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unreadable file and a `--var` that is not KEY=VALUE are usage errors (exit 2)."""
    assert main(["pipeline", "run", str(tmp_path / "none.yml"), "--token", "t"]) == 2
    assert "cannot read" in capsys.readouterr().err
    path = tmp_path / "ok.yml"
    path.write_text("build:\n  script: [make]\n")
    assert main(["pipeline", "run", str(path), "--var", "NOEQUALS", "--token", "t"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_an_unreachable_gateway_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file that cannot be sent is exit code 1, with the reason."""
    path = tmp_path / "ok.yml"
    path.write_text("build:\n  script: [make]\n")
    assert main(["pipeline", "run", str(path), "--url", "http://127.0.0.1:9", "--token", "t"]) == 1
    assert "cannot reach the gateway" in capsys.readouterr().err
