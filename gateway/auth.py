"""Bearer-token authentication for the API. Tokens are looked up by their SHA-256 only."""

from __future__ import annotations

from starlette.requests import Request

from gateway.clock import Clock
from gateway.errors import Unauthorized
from gateway.models import Principal
from gateway.store.base import Store
from gateway.tokens import token_hash

CACHE_TTL_S = 5.0
_CACHE_MAX = 1024


class Authenticator:
    """Resolves `Authorization: Bearer <token>` to a Principal, caching lookups briefly."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._cache: dict[bytes, tuple[Principal, float]] = {}

    async def require(self, request: Request) -> Principal:
        """The caller's principal; Unauthorized without a valid API token."""
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
