"""`gateway token create|list|revoke` against a real `gateway serve`."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.e2e.test_cli import gateway

pytestmark = pytest.mark.slow


def test_token_create_viewer_list_and_revoke(server_factory: Any) -> None:
    """`token create NAME --viewer` prints only the token on stdout; it reads but cannot
    write; `token list` shows it; `token revoke ID` ends it."""
    server = server_factory()
    auth = ("--url", server.url, "--token", server.token)
    created = gateway("token", "create", "wall-screen", "--viewer", *auth)
    token = created.stdout.strip()
    assert token.startswith("gw_")
    assert "viewer" in created.stderr
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{server.url}/api/v1/jobs", headers=headers).status_code == 200
    refused = httpx.post(f"{server.url}/api/v1/jobs", json={"name": "x"}, headers=headers)
    assert refused.status_code == 403
    listed = gateway("token", "list", *auth).stdout.splitlines()
    line = next(line for line in listed if line.endswith(" wall-screen"))
    token_id, scope = line.split()[:2]
    assert scope == "viewer"
    assert token not in "\n".join(listed)
    gateway("token", "revoke", token_id, *auth)
    assert httpx.get(f"{server.url}/api/v1/jobs", headers=headers).status_code == 401
    admin = gateway("token", "create", "deployer", *auth).stdout.strip()
    made = httpx.post(
        f"{server.url}/api/v1/jobs",
        json={"name": "x"},
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert made.status_code == 201
    again = gateway("token", "revoke", token_id, *auth, check=False)
    assert again.returncode == 1
    assert "404" in again.stderr
