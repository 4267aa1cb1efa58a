"""Standard Webhooks (v1, HMAC-SHA256): secrets, and the headers of one signed attempt.

The signed content is `{webhook-id}.{webhook-timestamp}.{body}`; `webhook-signature` lists one
`v1,<base64>` entry per active secret, separated by single spaces (the new secret first while a
rotation's old secret still signs).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> str:
    """`whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret; ValueError if it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with whsec_")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("a webhook secret holds 24 to 64 bytes")
    return key


def signature(secrets_: Sequence[str], message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for `body` under every secret given."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    entries = []
    for secret in secrets_:
        digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
        entries.append("v1," + base64.b64encode(digest).decode())
    return " ".join(entries)


def headers(
    secrets_: Sequence[str], message_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """Every header of one attempt; each attempt is signed afresh with its own timestamp."""
    return {
        "content-type": "application/json",
        "user-agent": "gateway-webhooks/1",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secrets_, message_id, timestamp, body),
    }
