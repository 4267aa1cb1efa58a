"""`gateway export` and `gateway import` as real subprocesses: a SQLite gateway's database moved to
a new SQLite file and to a fresh PostgreSQL database; `gateway serve` on the target shows the same
jobs, a continue URL minted before the move finishes its job after it, and the webhook deliveries
that were pending go out. Refusals exit 2, say why, and change nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks

from gateway.store.sqlite.schema import migrate
from gateway.transfer import TABLES
from tests.conftest import POSTGRES_DSN_VARIABLE, POSTGRES_HOWTO, ServerProcess, start_server
from tests.processes import wait_for
from tests.receivers import Receiver, Reply

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
ARTIFACT = b"\x00\x01\xfe binary report\n"
# Deliveries retry every second, so the ones pending at the move go out soon after it.
WEBHOOK_ENV = {
    "GATEWAY_WEBHOOK_ALLOW_NETS": "127.0.0.1/32",
    "GATEWAY_WEBHOOK_RETRY_SCHEDULE": ",".join(["1"] * 60),
    "GATEWAY_WEBHOOK_TIMEOUT_S": "2",
}


def gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m gateway ARGS` with no GATEWAY_* variables but those in `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=120,
    )


def refused(done: subprocess.CompletedProcess[str], reason: str) -> None:
    """Exit code 2, one line saying why (matching `reason`), no traceback."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert re.search(reason, done.stderr), done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


@contextmanager
def serving(data_dir: Path, *extra: str, env: dict[str, str]) -> Iterator[ServerProcess]:
    """`gateway serve` on `data_dir` for the block, which it must then leave with exit code 0;
    killed if the block fails."""
    server = start_server(data_dir, *extra, env=env)
    try:
        yield server
        assert server.terminate() == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=10)
        if server.proc.stdout:
            server.proc.stdout.close()


@dataclass
class Source:
    """A stopped SQLite gateway's data dir, its export, and what it showed before it stopped."""

    data_dir: Path
    export: Path
    jobs: list[dict[str, Any]]
    parked: dict[str, Any]
    parked_events: list[dict[str, Any]]
    viewer_token: str
    pending: set[str]  # webhook-ids of the deliveries pending in the export

    def keys(self) -> dict[str, str]:
        """The secrets the source generated into its data dir, as a target must be given them."""
        return {
            "GATEWAY_SECRET_KEY": (self.data_dir / "secret-key").read_text().strip(),
            "GATEWAY_WEBHOOK_SECRET": (self.data_dir / "webhook-secret").read_text().strip(),
        }


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """Answers 503 while the source runs (so deliveries stay pending), 200 after."""
    with Receiver(default=Reply(503)) as hook:
        yield hook


def rows_of(export: Path, table: str) -> list[dict[str, Any]]:
    lines = (json.loads(line) for line in export.read_text().splitlines())
    return [line["row"] for line in lines if line.get("table") == table]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Source:
    """A SQLite gateway with generated keys and some of everything: a parked external job with a
    trace and an artifact, a finished one, a canceled one and its retry, a pipeline, a viewer
    token, a subscription and an implicit one, deliveries pending; stopped, then exported."""
    root = tmp_path_factory.mktemp("source")
    # An empty GATEWAY_SECRET_KEY counts as unset: the key is generated into the data dir.
    with (
        serving(root / "data", env={"GATEWAY_SECRET_KEY": "", **WEBHOOK_ENV}) as server,
        server.client() as http,
    ):
        made = http.post("/api/v1/webhooks", json={"url": receiver.url("/all")})
        assert made.status_code == 201, made.text
        parked = http.post(
            "/api/v1/jobs", json={"name": "provision", "state_webhook_url": receiver.url()}
        ).json()
        url = parked["continue_url"]
        assert httpx.post(f"{url}/log", content=b"node n42 is booting\n").status_code < 300
        uploaded = httpx.put(
            f"{url}/artifacts/report.bin",
            content=ARTIFACT,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert uploaded.status_code == 201, uploaded.text
        finished = http.post("/api/v1/jobs", json={"name": "done"}).json()
        assert httpx.post(finished["continue_url"], json={"message": "ok"}).status_code == 200
        first = http.post("/api/v1/jobs", json={"name": "flaky"}).json()
        assert http.post(f"/api/v1/jobs/{first['id']}/cancel").status_code == 200
        assert http.post(f"/api/v1/jobs/{first['id']}/retry").status_code == 201
        pipeline = {
            "name": "release",
            "jobs": {
                "build": {"script": ["make"]},
                "ship": {"kind": "external", "needs": ["build"]},
            },
        }
        assert http.post("/api/v1/pipelines", json=pipeline).status_code == 201
        viewer = http.post("/api/v1/tokens", json={"name": "wall", "scope": "viewer"})
        assert viewer.status_code == 201, viewer.text
        wait_for(lambda: len(receiver.received) >= 3, "the first webhook attempts to fail")
        jobs = http.get("/api/v1/jobs", params={"limit": 500}).json()["items"]
        events = http.get(f"/api/v1/jobs/{parked['id']}/events").json()["items"]
    receiver.set_default(Reply(200))
    export = root / "gateway.jsonl"
    done = gateway("export", "--data-dir", str(root / "data"), str(export))
    assert done.returncode == 0, done.stderr
    assert re.match(r"exported \d+ rows of sqlite schema version \d+ to ", done.stdout)
    pending = {
        r["message_id"] for r in rows_of(export, "webhook_deliveries") if r["state"] == "pending"
    }
    assert len(pending) >= 3
    return Source(
        data_dir=root / "data",
        export=export,
        jobs=jobs,
        parked=parked,
        parked_events=events,
        viewer_token=viewer.json()["token"],
        pending=pending,
    )


def assert_moved(source: Source, receiver: Receiver, server: ServerProcess, before: int) -> None:
    """The target serves the source's jobs, events, trace, artifact and tokens; the old continue
    URL finishes its job; pending deliveries go out signed with the old webhook secret; new jobs
    get fresh ids and events. `before`: requests the receiver had before the target started."""
    job_id = source.parked["id"]
    with server.client() as http:
        assert http.get("/api/v1/jobs", params={"limit": 500}).json()["items"] == source.jobs
        assert http.get(f"/api/v1/jobs/{job_id}/events").json()["items"] == source.parked_events
        assert "node n42 is booting" in http.get(f"/api/v1/jobs/{job_id}/trace").text
        assert http.get(f"/api/v1/jobs/{job_id}/artifacts/report.bin").content == ARTIFACT
        viewer = {"Authorization": f"Bearer {source.viewer_token}"}
        assert http.get("/api/v1/jobs", headers=viewer).status_code == 200

        path = httpx.URL(source.parked["continue_url"]).path
        done = httpx.post(f"{server.url}{path}", json={"outputs": {"IP": "10.0.0.7"}})
        assert done.status_code == 200, done.text
        assert done.json() == {"job_id": job_id, "state": "success"}
        assert http.get(f"/api/v1/jobs/{job_id}").json()["outputs"] == {"IP": "10.0.0.7"}

        fresh = http.post("/api/v1/jobs", json={"name": "after-the-move"}).json()
        assert fresh["id"] not in {job["id"] for job in source.jobs}
        assert httpx.post(fresh["continue_url"]).json()["state"] == "success"
        sequences = [
            e["sequence"] for e in http.get(f"/api/v1/jobs/{fresh['id']}/events").json()["items"]
        ]
        assert sequences == [1, 2]

    def delivered() -> set[str]:
        return {r.webhook_id for r in receiver.received[before:] if r.ok}

    wait_for(lambda: source.pending <= delivered(), "the pending deliveries to go out")
    success = wait_for(
        lambda: [
            r
            for r in receiver.received[before:]
            if r.ok and r.path == "/hook" and r.json()["type"] == "job.success"
        ],
        "the parked job's success webhook",
    )[0]
    payload = standardwebhooks.Webhook(source.keys()["GATEWAY_WEBHOOK_SECRET"]).verify(
        success.body, dict(success.headers)
    )
    assert payload["data"]["id"] == job_id


@pytest.mark.slow
def test_sqlite_to_sqlite_round_trip(source: Source, receiver: Receiver, tmp_path: Path) -> None:
    """An export imported into a new SQLite file serves exactly what the source did; a second
    import into it is refused."""
    target = f"sqlite:///{tmp_path / 'moved.sqlite3'}"
    done = gateway("import", "--db", target, str(source.export))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported ")
    other_key = {**source.keys(), "GATEWAY_SECRET_KEY": "another-key-0123456789abcdef"}
    wrong = gateway(
        "serve", "--port", "0", "--data-dir", str(tmp_path / "other"), "--db", target, env=other_key
    )
    assert wrong.returncode != 0 and "GATEWAY_SECRET_KEY differs" in wrong.stderr, wrong.stderr
    before = len(receiver.received)
    with serving(tmp_path / "data", "--db", target, env={**source.keys(), **WEBHOOK_ENV}) as server:
        assert_moved(source, receiver, server, before)
    with closing(sqlite3.connect(tmp_path / "moved.sqlite3")) as conn:
        jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
    refused(gateway("import", "--db", target, str(source.export)), "not empty")
    with closing(sqlite3.connect(tmp_path / "moved.sqlite3")) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == jobs


@pytest.mark.slow
def test_sqlite_to_postgres(source: Source, receiver: Receiver, tmp_path: Path) -> None:
    """The same export imported into a fresh PostgreSQL database (migrated by the import) serves
    the same jobs; its id sequences continue after the imported ones (new events insert)."""
    dsn = os.environ.get(POSTGRES_DSN_VARIABLE)
    if not dsn:
        pytest.skip(POSTGRES_HOWTO)
    from bench.harness import postgres_database

    with postgres_database(dsn) as target:
        done = gateway("import", "--db", target, str(source.export))
        assert done.returncode == 0, done.stderr
        before = len(receiver.received)
        with serving(
            tmp_path / "data", "--db", target, env={**source.keys(), **WEBHOOK_ENV}
        ) as server:
            assert_moved(source, receiver, server, before)
        refused(gateway("import", "--db", target, str(source.export)), "not empty")
        # ...and back: the PostgreSQL database exports to a file a SQLite target imports.
        back = tmp_path / "back.jsonl.gz"
        assert gateway("export", "--db", target, str(back)).returncode == 0
        done = gateway("import", "--db", f"sqlite:///{tmp_path / 'back.sqlite3'}", str(back))
        assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_refusals_change_nothing(source: Source, tmp_path: Path) -> None:
    """A different schema version, a newer one, a cut-short file and a file that is no export
    are refused with exit code 2 and a reason; the target stays empty, so the whole file then
    imports into it."""
    target = f"sqlite:///{tmp_path / 'target.sqlite3'}"
    assert gateway("migrate", "--db", target).returncode == 0
    header, *rest = source.export.read_text().splitlines(keepends=True)

    def variant(name: str, lines: list[str]) -> str:
        path = tmp_path / name
        path.write_text("".join(lines))
        return str(path)

    older = json.loads(header) | {"schema_version": json.loads(header)["schema_version"] - 1}
    newer = json.loads(header) | {"schema_version": 99}
    refused(
        gateway(
            "import", "--db", target, variant("older.jsonl", [json.dumps(older) + "\n", *rest])
        ),
        "the target database is at schema version",
    )
    refused(
        gateway(
            "import", "--db", target, variant("newer.jsonl", [json.dumps(newer) + "\n", *rest])
        ),
        "newer than this gateway knows",
    )
    refused(
        gateway("import", "--db", target, variant("cut.jsonl", [header, *rest[:-1]])), "cut short"
    )
    refused(gateway("import", "--db", target, variant("junk.jsonl", ["hello\n"])), "not a JSON")
    refused(gateway("import", "--db", target, str(tmp_path / "missing.jsonl")), "cannot read")
    refused(gateway("export", "--data-dir", str(tmp_path / "nowhere"), "-"), "no gateway database")
    with closing(sqlite3.connect(tmp_path / "target.sqlite3")) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    done = gateway("import", "--db", target, str(source.export))
    assert done.returncode == 0, done.stderr


def test_tables_cover_the_schema_parents_first(tmp_path: Path) -> None:
    """Every table of a migrated database is exported (but the migrations' own), and every
    foreign key points at a table exported earlier (or at its own, for retries)."""
    with closing(sqlite3.connect(tmp_path / "fresh.sqlite3")) as conn:
        migrate(conn)
        names = {
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT IN ('schema_migrations', 'sqlite_sequence')"
            )
        }
        assert names == {table.name for table in TABLES}
        order = [table.name for table in TABLES]
        for position, table in enumerate(order):
            for reference in conn.execute(f"PRAGMA foreign_key_list({table})"):
                assert order.index(reference[2]) <= position, (table, reference[2])


def doc_block(marker: str) -> str:
    """The one fenced `sh` block of docs/operations.md holding `marker`, dedented."""
    blocks = re.findall(r"^( *)```sh\n(.*?)^\1```$", DOC.read_text(), re.MULTILINE | re.DOTALL)
    found = [textwrap.dedent(body) for _, body in blocks if marker in body]
    assert len(found) == 1, f"expected one sh block with {marker!r}, found {len(found)}"
    return found[0]


def run_doc_block(block: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `block` with bash, `gateway` on the PATH, no GATEWAY_* variables but `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_the_docs_move_recipe_runs_as_written(source: Source, tmp_path: Path) -> None:
    """docs/operations.md's export/import recipe, run as written from beside the SQLite data dir
    into PostgreSQL (SQLite without GATEWAY_TEST_POSTGRES_DSN), sets the variables a replica
    needs; a gateway started with them serves the same jobs to the old admin token."""
    shutil.copytree(source.data_dir, tmp_path / "gateway-data")
    report = (
        '\nprintf "%s\\n" "$GATEWAY_SECRET_KEY" "$GATEWAY_WEBHOOK_SECRET" "$GATEWAY_ADMIN_TOKEN"\n'
    )

    def move(target: str) -> None:
        done = run_doc_block(doc_block("gateway import") + report, tmp_path, {"GATEWAY_DB": target})
        assert done.returncode == 0, done.stderr
        secret_key, webhook_secret, admin_token = done.stdout.splitlines()[-3:]
        keys = source.keys()
        assert (secret_key, webhook_secret) == (
            keys["GATEWAY_SECRET_KEY"],
            keys["GATEWAY_WEBHOOK_SECRET"],
        )
        env = {
            "GATEWAY_SECRET_KEY": secret_key,
            "GATEWAY_WEBHOOK_SECRET": webhook_secret,
            **WEBHOOK_ENV,
        }
        with serving(tmp_path / "gateway-data", "--db", target, env=env) as server:
            assert server.token == admin_token
            with server.client() as http:
                assert (
                    http.get("/api/v1/jobs", params={"limit": 500}).json()["items"] == source.jobs
                )

    dsn = os.environ.get(POSTGRES_DSN_VARIABLE)
    if dsn:
        from bench.harness import postgres_database

        with postgres_database(dsn) as target:
            move(target)
    else:
        move(f"sqlite:///{tmp_path / 'moved.sqlite3'}")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="needs the sqlite3 command")
def test_the_docs_sqlite_backup_command_copies_the_database(source: Source, tmp_path: Path) -> None:
    """The online backup command of docs/operations.md, run as written beside the data dir,
    gives a database with the same jobs."""
    shutil.copytree(source.data_dir, tmp_path / "gateway-data")
    done = run_doc_block(doc_block(".backup"), tmp_path, {})
    assert done.returncode == 0, done.stderr
    query = "SELECT id, state FROM jobs ORDER BY id"
    with (
        closing(sqlite3.connect(tmp_path / "gateway-backup.sqlite3")) as backup,
        closing(sqlite3.connect(source.data_dir / "gateway.sqlite3")) as original,
    ):
        assert backup.execute(query).fetchall() == original.execute(query).fetchall()
