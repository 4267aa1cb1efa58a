"""Credentials: continue tokens (signed, derived from the secret key) and bearer tokens.

A continue token is `<material>.<signature>`: the material is an HMAC of the job id and a random
per-attempt nonce under the secret key, so the database (which keeps the nonce and a SHA-256 of the
token) holds nothing usable, while the server can re-derive a live token to mask it in traces.
The itsdangerous signature lets a forged token be refused before any database work.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import Signer

NONCE_BYTES = 16
MATERIAL_BYTES = 24  # 192 bits: above the 128 the contract asks for
API_TOKEN_PREFIX = "gw_"
RUNNER_TOKEN_PREFIX = "gwr_"
JOB_TOKEN_PREFIX = "gwj_"


def token_hash(token: str) -> bytes:
    """The only form in which a credential is stored."""
    return hashlib.sha256(token.encode()).digest()


def new_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def new_api_token() -> str:
    return API_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_runner_token() -> str:
    return RUNNER_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_job_token() -> str:
    """A job token: valid on the runner routes of one job while it is handed out or running."""
    return JOB_TOKEN_PREFIX + secrets.token_urlsafe(32)


def key_fingerprint(secret: str) -> str:
    """What the database keeps of a secret (the secret key, the webhook secret): enough to
    notice a replica started with another one."""
    return hashlib.sha256(b"gateway.key-fingerprint|" + secret.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ContinueCredential:
    """A freshly minted continue token, with what the store keeps of it."""

    nonce: bytes
    token: str
    token_hash: bytes


class ContinueTokens:
    """Mints, re-derives and checks continue tokens under one secret key."""

    def __init__(self, secret_key: str) -> None:
        self._key = secret_key.encode()
        self._signer = Signer(secret_key, salt="gateway.continue", digest_method=hashlib.sha256)

    def mint(self, job_id: str) -> ContinueCredential:
        nonce = secrets.token_bytes(NONCE_BYTES)
        token = self.derive(job_id, nonce)
        return ContinueCredential(nonce=nonce, token=token, token_hash=token_hash(token))

    def derive(self, job_id: str, nonce: bytes) -> str:
        """The token of `job_id`'s attempt with `nonce`; the same every time."""
        digest = hmac.new(
            self._key, b"gateway.continue|" + job_id.encode() + b"|" + nonce, "sha256"
        )
        material = base64.urlsafe_b64encode(digest.digest()[:MATERIAL_BYTES]).decode()
        return self._signer.sign(material).decode()

    def verify(self, token: str) -> bytes | None:
        """The hash to look the token up by, or None for a forged or malformed token."""
        if len(token) > 256:
            return None
        try:
            given = token.encode()
        except UnicodeError:
            return None
        material, sep, _ = given.rpartition(self._signer.sep)
        # A token is valid exactly when it is the signature of its material, spelled as
        # signing spells it (Base64 leaves spare bits in the signature's last character: a
        # one-character tampering must not pass). One signing checks both, in constant time.
        if not sep or not hmac.compare_digest(self._signer.sign(material), given):
            return None
        return token_hash(token)
