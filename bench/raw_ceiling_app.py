"""The raw ceiling for the callback hot path: a bare Starlette app whose `POST /continue/{token}`
runs the same kind of transaction as the gateway with plain `sqlite3`, right in the endpoint.

No signature check, no state machine, no metrics, no aiosqlite thread hop: only HTTP parsing
(uvicorn, 1 worker, uvloop + httptools when installed, no access log), a JSON body, a SHA-256 of
the token and BEGIN IMMEDIATE / SELECT by token_hash / UPDATE with a state CAS / INSERT an event /
COMMIT on a WAL database with `synchronous=NORMAL`. `bench/callbacks.py` drives it with the same
load generator as the gateway and prints gateway/raw.

Run: `python bench/raw_ceiling_app.py --db PATH` (the database must exist, see `create_db`);
prints `listening on http://HOST:PORT` once the socket is bound.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# The same kind of schema as the gateway's jobs/job_events: text ULID key, unique token_hash,
# the due-deadline and by-state indexes that a terminal UPDATE has to maintain too.
SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    outputs TEXT,
    message TEXT,
    finished_at REAL,
    deadline_at REAL,
    token_hash BLOB UNIQUE,
    event_sequence INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX jobs_due ON jobs (deadline_at) WHERE deadline_at IS NOT NULL;
CREATE INDEX jobs_by_state ON jobs (state, id);
CREATE TABLE job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    sequence INTEGER NOT NULL,
    state TEXT NOT NULL,
    previous_state TEXT,
    cause TEXT NOT NULL,
    at REAL NOT NULL,
    UNIQUE (job_id, sequence)
);
"""

SELECT_BY_TOKEN = "SELECT id, state, event_sequence FROM jobs WHERE token_hash = ?"
UPDATE_CAS = (
    "UPDATE jobs SET state = 'success', outputs = ?, message = ?, finished_at = ?,"
    " deadline_at = NULL, event_sequence = ? WHERE id = ? AND state = 'pending'"
    " AND event_sequence = ?"
)
INSERT_EVENT = (
    "INSERT INTO job_events (job_id, sequence, state, previous_state, cause, at)"
    " VALUES (?, ?, 'success', 'pending', 'callback', ?)"
)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def configure(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")


def create_db(path: Path, jobs: Iterable[tuple[str, str]], deadline_at: float) -> None:
    """A fresh database holding one parked (`pending`) job per `(job_id, token)`."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        configure(conn)
        conn.executescript(SCHEMA)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO jobs (id, state, deadline_at, token_hash) VALUES (?, 'pending', ?, ?)",
            ((job_id, deadline_at, token_hash(token)) for job_id, token in jobs),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def create_app(db_path: Path) -> Starlette:
    conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    configure(conn)

    async def post_continue(request: Request) -> Response:
        digest = token_hash(request.path_params["token"])
        raw = await request.body()
        body = json.loads(raw) if raw else {}
        if not isinstance(body, dict):
            return JSONResponse({"error": "invalid_field"}, status_code=422)
        outputs = body.get("outputs")
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(SELECT_BY_TOKEN, (digest,)).fetchone()
            if row is None:
                conn.execute("ROLLBACK")
                return JSONResponse({"error": "not_found"}, status_code=404)
            job_id, state, sequence = row
            updated = conn.execute(
                UPDATE_CAS,
                (
                    None if outputs is None else json.dumps(outputs),
                    body.get("message"),
                    now,
                    sequence + 1,
                    job_id,
                    sequence,
                ),
            ).rowcount
            if updated != 1:
                conn.execute("ROLLBACK")
                return JSONResponse({"error": "already_final", "state": state}, status_code=409)
            conn.execute(INSERT_EVENT, (job_id, sequence + 1, now))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return JSONResponse({"job_id": job_id, "state": "success"})

    async def readyz(request: Request) -> Response:
        return JSONResponse({"status": "ready"})

    return Starlette(
        routes=[
            Route("/continue/{token}", post_continue, methods=["POST"]),
            Route("/readyz", readyz, methods=["GET"]),
        ]
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    app = create_app(args.db)
    print(f"raw ceiling app listening on http://{args.host}:{sock.getsockname()[1]}", flush=True)
    # The same uvicorn configuration as `gateway serve`: loop/http "auto" pick uvloop and
    # httptools when installed; one worker; no access log.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
