"""The short crash audit: bench/chaos.py kills real gateways with SIGKILL under a mixed load and
finds every answered callback reflected, one terminal transition per attempt, every event
delivered with its stored content, no live URL on a terminal job (SQLite; PostgreSQL x2 too
when its DSN is set)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import POSTGRES_DSN_VARIABLE, POSTGRES_HOWTO

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KILLS = 5
RUN_LIMIT_S = 100


def run_chaos(*args: str) -> dict[str, Any]:
    """Run the script to its end; its exit code must be 0; returns its printed summary."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--quick", "--kills", str(KILLS), *args],
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT_S,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("summary ")]
    assert len(lines) == 1, done.stdout[-4000:]
    summary: dict[str, Any] = json.loads(lines[0].removeprefix("summary "))
    return summary


def check_counts(summary: dict[str, Any]) -> None:
    """The run did what it claims: kills, load of every kind, transitions, deliveries."""
    assert summary["kills"] == KILLS
    assert summary["violations"] == 0
    requests = summary["requests"]
    for kind in ("job.create", "pipeline.create", "continue.call", "runner.confirm", "runner.exit"):
        assert requests.get(f"{kind}:2xx", 0) > 0, (kind, requests)
    assert requests.get("continue.call:4xx", 0) > 0  # repeats that lost a race, late callers
    assert not any(key.endswith(":5xx") for key in requests), requests
    assert summary["jobs"] >= summary["jobs_tracked"] > 0
    assert {"success", "failed"} <= set(summary["jobs_by_state"])
    assert summary["jobs_with_accepted_calls"] > 0
    assert summary["transitions"] > summary["jobs"]
    assert summary["terminal_tokens_probed"] > 0
    assert (
        summary["deliveries_received"] >= summary["transitions"] + summary["pipeline_transitions"]
    )
    assert set(summary["deliveries_by_state"]) == {"succeeded"}


def test_sqlite_gateway_killed_five_times_loses_nothing() -> None:
    """One SQLite gateway, SIGKILLed and restarted 5 times under load: the audit is clean."""
    check_counts(run_chaos("--seed", "7"))


def test_two_postgres_replicas_killed_five_times_lose_nothing() -> None:
    """Two replicas on one fresh PostgreSQL database, 5 kills between them: the audit is clean."""
    dsn = os.environ.get(POSTGRES_DSN_VARIABLE)
    if not dsn:
        pytest.skip(POSTGRES_HOWTO)
    check_counts(run_chaos("--seed", "7", "--db", dsn, "--replicas", "2"))
