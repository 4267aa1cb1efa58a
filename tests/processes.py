"""Helpers for the tests that run real processes: polling with a deadline, and finding the
processes of a job's script through /proc."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
DEADLINE_S = 20.0


def wait_for(check: Callable[[], T | None], what: str, timeout_s: float = DEADLINE_S) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling with a deadline, not synchronisation by sleep
    return value


def job_processes(job_id: str) -> list[int]:
    """Live processes whose environment says they run `job_id` (a runner's script and its
    children get `CI_JOB_ID`)."""
    marker = f"CI_JOB_ID={job_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in environ.split(b"\0") and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found
