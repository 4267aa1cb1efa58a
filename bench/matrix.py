"""The callback and dispatch benchmarks on SQLite x1, PostgreSQL x1 and PostgreSQL x2, in one run,
summarised in one table (issue 5: the figures docs/performance.md quotes side by side).

Run: `.venv/bin/python bench/matrix.py [--db postgresql://...] [--quick] [--only NAME]
[--json PATH]`. `--db` names the PostgreSQL server (default `$GATEWAY_TEST_POSTGRES_DSN`, else
postgresql://postgres@127.0.0.1:5432/test); every PostgreSQL run makes fresh databases on it and
drops them after. Each benchmark runs as its own `bench/<name>.py --json ...` subprocess (its
output goes by as it runs, its own table included), one shape after the other; the table at the
end picks the headline figures of each. `--quick` passes `--quick` on. The exit code is non-zero
when any run failed a check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import ROOT, describe_checkout, print_table, run_context

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
BENCHES = ("callbacks", "dispatch")


@dataclass(frozen=True)
class Shape:
    label: str
    db: bool
    replicas: int

    def arguments(self, dsn: str) -> list[str]:
        return ["--db", dsn, "--replicas", str(self.replicas)] if self.db else []


SHAPES = (
    Shape("SQLite x1", False, 1),
    Shape("PostgreSQL x1", True, 1),
    Shape("PostgreSQL x2", True, 2),
)

Figure = tuple[str, Callable[[dict[str, Any]], str]]


def _number(value: float, digits: int = 0) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _postgres(record: dict[str, Any], value: float, digits: int) -> str:
    return _number(value, digits) if record.get("store") == "postgresql" else "-"


FIGURES: dict[str, list[Figure]] = {
    "callbacks": [
        ("callbacks/s, gateway", lambda r: _number(r["gateway"]["per_s"])),
        ("callbacks/s, raw ceiling", lambda r: _number(r["raw"]["per_s"])),
        ("ratio gateway/raw", lambda r: _number(r["ratio"], 2)),
        (
            "callback p50 / p99 (ms)",
            lambda r: f"{r['gateway']['p50_ms']:.1f} / {r['gateway']['p99_ms']:.1f}",
        ),
        (
            "gateway CPU per callback (ms)",
            lambda r: _number(r["gateway"]["server_cpu_ms_per_req"], 3),
        ),
        (
            "PostgreSQL CPU per callback (ms)",
            lambda r: _postgres(r, r["gateway"]["postgres_cpu_ms_per_req"], 3),
        ),
        ("job creation via API (jobs/s)", lambda r: _number(r["create_per_s"])),
        (
            "VmRSS after the hot path (MB, per replica)",
            lambda r: ", ".join(
                f"{mb:.1f}" for mb in r.get("replica_rss_mb") or [r["gateway_rss_after_load_mb"]]
            ),
        ),
        (
            "VmRSS with parked jobs (MB)",
            lambda r: (
                "-"
                if r.get("store") == "postgresql"
                else (f"{r['rss_mb']:.1f} ({r['parked']:,} parked)")
            ),
        ),
        ("sweep of 100k expired deadlines (s)", lambda r: _number(r["sweep_s"], 2)),
    ],
    "dispatch": [
        ("hand-outs/s (request -> confirm -> exit)", lambda r: _number(r["handouts_per_s"])),
        (
            "hand-out cycle p50 / p99 (ms)",
            lambda r: f"{r['cycle_p50_ms']:.1f} / {r['cycle_p99_ms']:.1f}",
        ),
        ("gateway CPU per cycle (ms)", lambda r: _number(r["server_cpu_ms_per_handout"], 2)),
        (
            "PostgreSQL CPU per cycle (ms)",
            lambda r: _postgres(r, r.get("postgres_cpu_ms_per_handout", math.nan), 2),
        ),
        (
            "long-poll wake p50 / p99 (ms; across replicas on x2)",
            lambda r: f"{r['wake_p50_ms']:.1f} / {r['wake_p99_ms']:.1f}",
        ),
        ("runner-seconds of an async job (s)", lambda r: _number(r["async_runner_s"], 3)),
    ],
}


def run_one(name: str, shape: Shape, dsn: str, quick: bool, out: Path) -> dict[str, Any] | None:
    """`bench/<name>.py` in the given shape; its JSON record, or None when it failed."""
    command = [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--json", str(out)]
    command += shape.arguments(dsn) + (["--quick"] if quick else [])
    print(f"\n=== bench/{name}.py on {shape.label}: {' '.join(command[1:])}", flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0 or not out.exists():
        print(f"=== bench/{name}.py on {shape.label} FAILED", flush=True)
        return None
    record: dict[str, Any] = json.loads(out.read_text())
    return record


def table(records: dict[str, dict[str, dict[str, Any] | None]]) -> list[list[str]]:
    rows: list[list[str]] = []
    for name, figures in FIGURES.items():
        if name not in records:
            continue
        rows.append([f"[{name}]", *("" for _ in SHAPES)])
        for label, pick in figures:
            cells = []
            for shape in SHAPES:
                record = records[name].get(shape.label)
                try:
                    cells.append("FAILED" if record is None else pick(record))
                except (KeyError, TypeError):
                    cells.append("?")
            rows.append([label, *cells])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="the PostgreSQL server (default: see the docstring)")
    parser.add_argument("--quick", action="store_true", help="small sizes (each bench's --quick)")
    parser.add_argument("--only", choices=BENCHES, help="one benchmark only")
    parser.add_argument("--json", type=Path, help="also write every run's figures to this file")
    args = parser.parse_args(argv)
    dsn = args.db or os.environ.get("GATEWAY_TEST_POSTGRES_DSN") or DEFAULT_DSN
    names = [args.only] if args.only else list(BENCHES)
    print(
        f"bench/matrix.py: {', '.join(names)} on {', '.join(s.label for s in SHAPES)};"
        f" {'quick; ' if args.quick else ''}{run_context()}",
        flush=True,
    )
    started = time.perf_counter()
    records: dict[str, dict[str, dict[str, Any] | None]] = {}
    with tempfile.TemporaryDirectory(prefix="gateway-bench-matrix-") as tmp:
        for name in names:
            records[name] = {}
            for index, shape in enumerate(SHAPES):
                out = Path(tmp) / f"{name}-{index}.json"
                records[name][shape.label] = run_one(name, shape, dsn, args.quick, out)
    print(f"\nbench/matrix.py, code {describe_checkout()}:")
    print_table(table(records), header=["figure", *(shape.label for shape in SHAPES)])
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    failed = any(record is None for runs in records.values() for record in runs.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
