"""API token verbs: create (admin or viewer), list, find by id, revoke.

The table keeps each token's SHA-256 only. A revoked token's row stays (listed with its
`revoked_at`) until a new token takes its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.errors import NotFound, StateConflict
from gateway.models import ApiToken, Page
from gateway.store.base import decode_cursor, encode_cursor
from gateway.store.verbs.connection import Connection
from gateway.store.verbs.tx import Tx

BOOTSTRAP_TOKEN_ID = "admin"  # the row `ensure_api_token` keeps for GATEWAY_ADMIN_TOKEN
_COLUMNS = "id, name, scope, token_hash, created_at, revoked_at"


def _load(row: Sequence[Any]) -> ApiToken:
    return ApiToken(
        id=row[0],
        name=row[1],
        scope=row[2],
        token_hash=bytes(row[3]),
        created_at=row[4],
        revoked_at=row[5],
    )


def create_api_token(tx: Tx, token_id: str, name: str, token_hash: bytes, scope: str) -> ApiToken:
    """A new live token; StateConflict when a live token has that name."""
    held = tx.conn.execute(
        "SELECT id, revoked_at FROM api_tokens WHERE name = ?", (name,)
    ).fetchone()
    if held is not None:
        if held[1] is None:
            raise StateConflict(f"a token named `{name}` exists; revoke it or pick another name")
        tx.conn.execute("DELETE FROM api_tokens WHERE id = ?", (held[0],))
    tx.conn.execute(
        "INSERT INTO api_tokens (id, name, token_hash, scope, created_at) VALUES (?, ?, ?, ?, ?)",
        (token_id, name, token_hash, scope, tx.now),
    )
    return ApiToken(
        id=token_id,
        name=name,
        scope=scope,
        token_hash=token_hash,
        created_at=tx.now,
        revoked_at=None,
    )


def list_api_tokens(conn: Connection, *, limit: int, cursor: str | None) -> Page[ApiToken]:
    """Every token, revoked ones included, by id."""
    after = "" if cursor is None else decode_cursor(cursor, "k:")
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM api_tokens WHERE id > ? ORDER BY id LIMIT ?", (after, limit + 1)
    ).fetchall()
    items = [_load(row) for row in rows[:limit]]
    more = len(rows) > limit
    return Page(items=items, next_cursor=encode_cursor("k:" + items[-1].id) if more else None)


def find_api_token_by_id(conn: Connection, token_id: str) -> ApiToken | None:
    """The live (not revoked) token with this id."""
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM api_tokens WHERE id = ? AND revoked_at IS NULL", (token_id,)
    ).fetchone()
    return None if row is None else _load(row)


def revoke_api_token(tx: Tx, token_id: str) -> None:
    """NotFound for an unknown or already revoked token; StateConflict for the bootstrap admin
    token, which the next start would bring back (change GATEWAY_ADMIN_TOKEN instead)."""
    if token_id == BOOTSTRAP_TOKEN_ID:
        raise StateConflict(
            "the bootstrap admin token comes back at every start; change GATEWAY_ADMIN_TOKEN"
            " (or the data dir's admin-token file) and restart instead"
        )
    revoked = tx.conn.execute(
        "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        (tx.now, token_id),
    ).rowcount
    if revoked == 0:
        raise NotFound(f"no live token {token_id}")
