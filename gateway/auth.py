"""Authentication for the API: bearer tokens looked up by their SHA-256 only, or the dashboard's
session cookie (see `gateway.sessions`); and the scope rules: a `viewer` token reads, only an
`admin` token writes."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from gateway.clock import Clock
from gateway.errors import Forbidden, Unauthorized
from gateway.models import Principal
from gateway.sessions import (
    CSRF_HEADER,
    SAFE_METHODS,
    SESSION_COOKIE,
    Session,
    Sessions,
    csrf_matches,
    token_fingerprint,
)
from gateway.store.base import Store
from gateway.tokens import token_hash

CACHE_TTL_S = 5.0
_CACHE_MAX = 1024
ADMIN_SCOPE = "admin"
VIEWER_SCOPE = "viewer"


@dataclass(frozen=True)
class SignedIn:
    """A dashboard session whose token is still live."""

    principal: Principal
    session: Session


class Authenticator:
    """Resolves `Authorization: Bearer <token>` (cached briefly) or a session cookie (checked
    against the database every time) to a Principal, and applies the scope rules."""

    def __init__(self, store: Store, clock: Clock, sessions: Sessions | None = None) -> None:
        self._store = store
        self._clock = clock
        self.sessions = sessions
        self._cache: dict[bytes, tuple[Principal, float]] = {}

    async def require(self, request: Request, *, admin: bool = False) -> Principal:
        """The caller's principal. Unauthorized without a valid API token or session;
        Forbidden for an unsafe method made with a session but without its CSRF token, for a
        write by a viewer token, and for an admin-only route (`admin`) called by a viewer."""
        if "authorization" not in request.headers and SESSION_COOKIE in request.cookies:
            signed_in = await self.signed_in(request)
            if signed_in is None:
                raise Unauthorized("the session ended; sign in again")
            if request.method not in SAFE_METHODS and not csrf_matches(
                signed_in.session.csrf, request.headers.get(CSRF_HEADER)
            ):
                raise Forbidden("a request made with a session must carry its CSRF token")
            principal = signed_in.principal
        else:
            principal = await self._bearer(request)
        if principal.scope != ADMIN_SCOPE:
            if admin:
                raise Forbidden("this route needs an admin token")
            if request.method not in SAFE_METHODS:
                raise Forbidden("a viewer token may only read")
        return principal

    async def _bearer(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send `Authorization: Bearer <API token>`")
        digest = token_hash(token.strip())
        now = self._clock.now()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        principal = await self._store.find_api_token(digest)
        if principal is None:
            raise Unauthorized("the token is not valid")
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = (principal, now + CACHE_TTL_S)
        return principal

    async def signed_in(self, request: Request) -> SignedIn | None:
        """The request's dashboard session, when its cookie is valid and unexpired and its
        token is live and unchanged (looked up now, never cached)."""
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie is None or self.sessions is None:
            return None
        session = self.sessions.read(cookie)
        if session is None:
            return None
        token = await self._store.find_api_token_by_id(session.token_id)
        if token is None or token_fingerprint(token.token_hash) != session.token_check:
            return None
        return SignedIn(principal=token.principal, session=session)

    def forget(self) -> None:
        """Drop cached lookups (a token was revoked: it stops working here at once)."""
        self._cache.clear()
