"""Dashboard sessions: a signed cookie naming the API token that signed in, and CSRF tokens.

The cookie holds the token's id, a fingerprint of the token's hash, a CSRF token and an
expiry, signed with the server's secret key (itsdangerous). It holds no credential: every
request looks the token up by id, so a revoked (or replaced) token ends its sessions at once.
Signing out deletes the cookie. Unsafe requests made with a session must carry its CSRF token
(a form field or the `X-CSRF-Token` header); the sign-in form, made before any session exists,
is protected by a double-submit cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeSerializer

from gateway.clock import Clock

SESSION_COOKIE = "gateway_session"
LOGIN_CSRF_COOKIE = "gateway_login_csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SESSION_TTL_S = 12 * 3600
LOGIN_FORM_TTL_S = 3600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_MAX_COOKIE_CHARS = 1024


@dataclass(frozen=True)
class Session:
    """What a valid session cookie says."""

    token_id: str
    token_check: str
    csrf: str
    expires_at: float


def token_fingerprint(token_hash: bytes) -> str:
    """What a session keeps of its token's hash: enough to notice the token was replaced."""
    return hashlib.sha256(b"gateway.session|" + token_hash).hexdigest()[:32]


def csrf_matches(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


class Sessions:
    """Issues and reads session cookies under the server's secret key, timed by `clock`."""

    def __init__(self, secret_key: str, clock: Clock, *, ttl_s: float = SESSION_TTL_S) -> None:
        self._serializer = URLSafeSerializer(secret_key, salt="gateway.session")
        self._clock = clock
        self.ttl_s = ttl_s

    def issue(self, token_id: str, token_hash: bytes) -> tuple[Session, str]:
        """A new session for the token (with a fresh CSRF token) and its cookie value."""
        session = Session(
            token_id=token_id,
            token_check=token_fingerprint(token_hash),
            csrf=secrets.token_urlsafe(32),
            expires_at=self._clock.now() + self.ttl_s,
        )
        value = self._serializer.dumps(
            [session.token_id, session.token_check, session.csrf, session.expires_at]
        )
        return session, value

    def read(self, cookie: str) -> Session | None:
        """The session a cookie carries; None when forged, malformed or expired."""
        if len(cookie) > _MAX_COOKIE_CHARS:
            return None
        try:
            fields = self._serializer.loads(cookie)
        except (BadSignature, UnicodeError, ValueError):
            return None
        if not (
            isinstance(fields, list)
            and len(fields) == 4
            and all(isinstance(f, str) for f in fields[:3])
            and isinstance(fields[3], int | float)
        ):
            return None
        session = Session(
            token_id=fields[0], token_check=fields[1], csrf=fields[2], expires_at=fields[3]
        )
        if session.expires_at <= self._clock.now():
            return None
        return session
