"""bench/harness.py starts real gateways (one on SQLite; a cluster on a fresh PostgreSQL
database), kills and restarts replicas, and its receiver records what a gateway delivers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from bench.harness import (
    ADMIN_TOKEN,
    Cluster,
    HarnessError,
    Receiver,
    postgres_database,
    run_async,
    start_gateway,
    with_host,
)
from tests.conftest import POSTGRES_DSN_VARIABLE, POSTGRES_HOWTO
from tests.processes import wait_for

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def park_job(url: str, **fields: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{url}/api/v1/jobs", json={"name": "harness", **fields}, headers=AUTH, timeout=10
    )
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    assert job["state"] == "pending"
    return job


def test_sqlite_gateway_delivers_to_the_receiver_and_stops_cleanly(tmp_path: Path) -> None:
    """One SQLite gateway: a job's callback reaches success and its state webhook is recorded
    by the receiver process, signed; CPU and memory are readable; SIGTERM exits 0."""
    with Receiver() as receiver:
        hook = receiver.start(tmp_path / "received.jsonl")
        with start_gateway(tmp_path / "gw") as gateway:
            job = park_job(gateway.url, state_webhook_url=f"{hook}/state")
            assert job["continue_url"].startswith(gateway.url)
            done = httpx.post(job["continue_url"], json={"outputs": {"A": "1"}}, timeout=10)
            assert done.status_code == 200 and done.json()["state"] == "success"
            records = wait_for(
                lambda: [r for r in receiver.records() if job["id"] in r["body"]],
                "the receiver to record the job's webhook",
            )
            assert gateway.cpu_s() > 0
            assert gateway.memory_kb()["VmRSS"] > 0
        assert gateway.process.returncode == 0
    first = records[0]
    assert first["path"] == "/state" and first["status"] == 200
    assert first["webhook-id"] and first["webhook-signature"].startswith("v1,")
    assert json.loads(first["body"])["data"]["id"] == job["id"]


def test_receiver_fails_the_planned_share_of_requests(tmp_path: Path) -> None:
    """fail_rate=1 answers 500 to everything, and still records each request."""
    with Receiver() as receiver:
        url = receiver.start(tmp_path / "r.jsonl", fail_rate=1.0, seed=3)
        answers = [httpx.post(f"{url}/x", content=b"{}", timeout=10).status_code for _ in range(3)]
        assert answers == [500, 500, 500]
        assert [r["status"] for r in receiver.records()] == [500, 500, 500]


def test_a_failed_start_says_why(tmp_path: Path) -> None:
    """A gateway that cannot start raises HarnessError carrying its log."""
    with pytest.raises(HarnessError, match="GATEWAY_PUBLIC_URL"):
        start_gateway(tmp_path / "bad", env={"GATEWAY_PUBLIC_URL": "ftp://nowhere"})


def test_several_replicas_need_postgres(tmp_path: Path) -> None:
    with pytest.raises(HarnessError):
        Cluster(tmp_path, replicas=2)


def test_two_replicas_on_a_fresh_database_survive_a_kill(tmp_path: Path) -> None:
    """Two replicas on a fresh PostgreSQL database: a job made on replica 0 is continued on
    replica 1; replica 1 is killed with SIGKILL and restarted on a new port, where a job made
    on replica 0 is continued again; the database is dropped afterwards."""
    server_dsn = os.environ.get(POSTGRES_DSN_VARIABLE)
    if not server_dsn:
        pytest.skip(POSTGRES_HOWTO)
    with postgres_database(server_dsn) as dsn:
        name = dsn.rsplit("/", 1)[1]
        with Cluster(tmp_path, replicas=2, db=dsn) as cluster:
            zero, one = cluster.gateways
            assert zero.url != one.url
            job = park_job(zero.url)
            assert cluster.public_url is not None
            assert job["continue_url"].startswith(cluster.public_url)
            answer = httpx.post(with_host(job["continue_url"], one.url), json={}, timeout=10)
            assert answer.status_code == 200 and answer.json()["state"] == "success"
            cluster.kill(1)
            assert one.process.returncode == -9
            again = cluster.restart(1)
            assert again.url != one.url and again.alive()
            job = park_job(zero.url)
            answer = httpx.post(with_host(job["continue_url"], again.url), json={}, timeout=10)
            assert answer.status_code == 200 and answer.json()["state"] == "success"
        assert all(g.process.returncode is not None for g in cluster.gateways)

    async def exists() -> bool:
        conn = await asyncpg.connect(server_dsn)
        try:
            return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
        finally:
            await conn.close()

    assert not run_async(exists)
