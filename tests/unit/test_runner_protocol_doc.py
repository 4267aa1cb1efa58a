"""docs/runner-protocol.md lists exactly the runner routes the app serves, both ways."""

from __future__ import annotations

import re
from pathlib import Path

from starlette.routing import Route

from gateway.app import create_app
from gateway.config import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "runner-protocol.md"
ROUTE_CELL = re.compile(r"^\|\s*`([A-Z]+) (/[^`\s]*)`\s*\|")


def documented_routes(text: str) -> set[tuple[str, str]]:
    """(METHOD, path) of every row of the table under `## Routes` whose first cell is
    `` `METHOD /path` ``."""
    section = text.split("\n## Routes\n", 1)[1].split("\n## ", 1)[0]
    found = set()
    for line in section.splitlines():
        match = ROUTE_CELL.match(line)
        if match:
            found.add((match.group(1), match.group(2)))
    return found


def runner_routes(settings: Settings) -> set[tuple[str, str]]:
    """(METHOD, path) of every route of the app under /api/v1/runner/ or /api/v1/runners;
    HEAD, which Starlette adds to every GET, is left out."""
    app = create_app(settings, run_sweeper=False)
    served = set()
    for route in app.routes:
        if not isinstance(route, Route):
            continue
        path = route.path
        if not (
            path.startswith("/api/v1/runner/")
            or path == "/api/v1/runners"
            or path.startswith("/api/v1/runners/")
        ):
            continue
        served.update((method, path) for method in route.methods or () if method != "HEAD")
    return served


def test_the_route_table_parses_into_the_routes_written_in_it() -> None:
    """The parser reads `METHOD /path` first cells of the Routes table and nothing else."""
    text = (
        "intro\n| `GET /outside` | x |\n## Routes\n\n| route | c |\n|---|---|\n"
        "| `POST /api/v1/runners` | API |\n| `PUT /api/v1/runner/jobs/{job_id}` | job |\n"
        "not a row `GET /nope`\n## Next\n| `GET /after` | x |\n"
    )
    assert documented_routes(text) == {
        ("POST", "/api/v1/runners"),
        ("PUT", "/api/v1/runner/jobs/{job_id}"),
    }


def test_every_documented_runner_route_is_served_and_every_served_one_is_documented(
    settings: Settings,
) -> None:
    """The Routes table of docs/runner-protocol.md equals the app's runner routes."""
    documented = documented_routes(DOC.read_text())
    served = runner_routes(settings)
    assert served, "the app serves no runner route: the filter is wrong"
    assert documented - served == set(), "documented but not served"
    assert served - documented == set(), "served but not documented"
