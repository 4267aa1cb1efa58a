"""The verification recipes in docs/webhooks.md, run exactly as written on deliveries signed by
the gateway's own signer; and the doc's lists agree with the code."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.webhooks import signing
from gateway.webhooks.events import EVENT_TYPES

DOC = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"
MESSAGE_ID = "job_01JXA4K5T8M2Q9W3E7R6Y1B0CD_3"
BODY = json.dumps(
    {"type": "job.success", "timestamp": "2025-06-01T12:00:03.120Z", "data": {"sequence": 3}},
    separators=(",", ":"),
).encode()


def recipe(language: str, marker: str) -> str:
    """The one fenced `language` block of the doc that contains `marker`."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", DOC.read_text(), re.MULTILINE | re.DOTALL)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"expected one {language} block with {marker!r}, found {len(found)}"
    return found[0]


def delivery(
    *,
    secrets: tuple[str, ...],
    body: bytes = BODY,
    age_s: int = 0,
) -> tuple[dict[str, str], bytes]:
    """The headers and body of one attempt as the dispatcher signs it."""
    return signing.headers(secrets, MESSAGE_ID, int(time.time()) - age_s, body), body


SECRET = signing.new_secret()
CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("genuine", {"secrets": (SECRET,)}, True),
    ("rotating, old secret second", {"secrets": (signing.new_secret(), SECRET)}, True),
    ("other secret", {"secrets": (signing.new_secret(),)}, False),
    ("stale", {"secrets": (SECRET,), "age_s": 400}, False),
]


def tamper(headers: dict[str, str], body: bytes) -> tuple[dict[str, str], bytes]:
    return headers, body.replace(b"success", b"failed!")


# --------------------------------------------------------------------------------------------
# Shell (openssl)
# --------------------------------------------------------------------------------------------


def run_shell(
    tmp_path: Path, headers: dict[str, str], body: bytes, secret: str = SECRET
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "verify-webhook.sh"
    script.write_text(recipe("sh", "openssl dgst"))
    body_file = tmp_path / "body.json"
    body_file.write_bytes(body)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "WEBHOOK_SECRET": secret,
        "WEBHOOK_ID": headers["webhook-id"],
        "WEBHOOK_TIMESTAMP": headers["webhook-timestamp"],
        "WEBHOOK_SIGNATURE": headers["webhook-signature"],
    }
    return subprocess.run(
        ["bash", str(script), str(body_file)], capture_output=True, text=True, env=env, timeout=30
    )


needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("bash") is None,
    reason="the shell recipe needs openssl and bash",
)


@needs_openssl
@pytest.mark.parametrize(("case", "delivery_args", "genuine"), CASES, ids=[c[0] for c in CASES])
def test_shell_recipe_verifies_exactly_the_genuine_fresh_deliveries(
    tmp_path: Path, case: str, delivery_args: dict[str, Any], genuine: bool
) -> None:
    """The documented openssl script prints `verified` (exit 0) for a delivery signed with the
    secret, also beside a new one while rotating, and refuses other secrets and stale ones."""
    done = run_shell(tmp_path, *delivery(**delivery_args))
    assert (done.returncode, done.stdout.strip() == "verified") == (
        (0, True) if genuine else (1, False)
    ), done.stdout + done.stderr


@needs_openssl
def test_shell_recipe_refuses_a_tampered_body(tmp_path: Path) -> None:
    """A body changed after signing is not verified."""
    done = run_shell(tmp_path, *tamper(*delivery(secrets=(SECRET,))))
    assert done.returncode == 1
    assert done.stdout.strip() == "no signature matches"


@needs_openssl
def test_shell_recipe_hmac_equals_the_gateway_signature_for_keys_with_any_byte(
    tmp_path: Path,
) -> None:
    """The openssl HMAC, keyed by hex, matches the gateway's for keys holding NUL, newline and
    high bytes (which `-hmac <text>` could not carry)."""
    for raw_key in (bytes(32), b"\n" * 24, bytes(range(200, 248)), os.urandom(64)):
        secret = "whsec_" + base64.b64encode(raw_key).decode()
        headers = signing.headers([secret], MESSAGE_ID, int(time.time()), BODY)
        done = run_shell(tmp_path, headers, BODY, secret)
        assert done.stdout.strip() == "verified", (raw_key, done.stdout, done.stderr)


# --------------------------------------------------------------------------------------------
# Node.js
# --------------------------------------------------------------------------------------------

NODE_HARNESS = """
const headers = JSON.parse(process.env.HEADERS);
const body = require("node:fs").readFileSync(0);
try {
  console.log("verified " + verifyWebhook(process.env.WEBHOOK_SECRET, headers, body));
} catch (error) {
  console.log(error.message);
  process.exit(1);
}
"""


def run_node(headers: dict[str, str], body: bytes) -> subprocess.CompletedProcess[bytes]:
    program = recipe("js", "function verifyWebhook") + NODE_HARNESS
    env = {**os.environ, "WEBHOOK_SECRET": SECRET, "HEADERS": json.dumps(headers)}
    return subprocess.run(
        ["node", "-e", program], input=body, capture_output=True, env=env, timeout=30
    )


needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@needs_node
@pytest.mark.parametrize(("case", "delivery_args", "genuine"), CASES, ids=[c[0] for c in CASES])
def test_node_recipe_verifies_exactly_the_genuine_fresh_deliveries(
    case: str, delivery_args: dict[str, Any], genuine: bool
) -> None:
    """The documented Node function returns the webhook-id of a genuine delivery and throws
    for other secrets and stale ones."""
    done = run_node(*delivery(**delivery_args))
    verified = done.stdout.decode().strip() == f"verified {MESSAGE_ID}"
    assert (done.returncode == 0, verified) == (genuine, genuine), done.stdout + done.stderr


@needs_node
def test_node_recipe_refuses_a_tampered_body() -> None:
    """A body changed after signing is not verified."""
    done = run_node(*tamper(*delivery(secrets=(SECRET,))))
    assert done.returncode == 1
    assert done.stdout.decode().strip() == "no signature matches"


# --------------------------------------------------------------------------------------------
# Python
# --------------------------------------------------------------------------------------------


def python_verify() -> Any:
    namespace: dict[str, Any] = {}
    exec(recipe("python", "def verify"), namespace)
    return namespace["verify"]


@pytest.mark.parametrize(("case", "delivery_args", "genuine"), CASES, ids=[c[0] for c in CASES])
def test_python_recipe_verifies_exactly_the_genuine_fresh_deliveries(
    case: str, delivery_args: dict[str, Any], genuine: bool
) -> None:
    """The documented hmac function returns the webhook-id of a genuine delivery and raises
    ValueError for other secrets and stale ones."""
    verify = python_verify()
    headers, body = delivery(**delivery_args)
    if genuine:
        assert verify(SECRET, headers, body) == MESSAGE_ID
    else:
        with pytest.raises(ValueError):
            verify(SECRET, headers, body)


def test_python_recipe_refuses_a_tampered_body() -> None:
    """A body changed after signing is not verified."""
    with pytest.raises(ValueError, match="no signature matches"):
        python_verify()(SECRET, *tamper(*delivery(secrets=(SECRET,))))


# --------------------------------------------------------------------------------------------
# The doc and the code agree
# --------------------------------------------------------------------------------------------


def test_doc_lists_every_event_type_and_no_other() -> None:
    """The events table names exactly the event types the gateway emits."""
    table = DOC.read_text().split("## Events", 1)[1].split("\n\n", 2)[1]
    named = set(re.findall(r"`((?:job|pipeline)\.[a-z]+)`", table))
    assert named == EVENT_TYPES
