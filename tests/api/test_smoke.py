"""The app answers over HTTP with a real SQLite file: the minimal path of one external job."""

from __future__ import annotations

import httpx

from tests.conftest import continue_path, create_job


async def test_external_job_finishes_through_its_continue_url(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    job = await create_job(client)
    assert job["state"] == "pending"
    response = await anon.post(continue_path(job), json={"outputs": {"IP": "10.0.0.1"}})
    assert response.status_code == 200
    assert response.json() == {"job_id": job["id"], "state": "success"}
    stored = (await client.get(f"/api/v1/jobs/{job['id']}")).json()
    assert stored["state"] == "success"
    assert stored["outputs"] == {"IP": "10.0.0.1"}
    assert "continue_url" not in stored
