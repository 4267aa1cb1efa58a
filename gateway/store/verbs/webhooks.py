"""Webhook verbs: endpoints, the delivery log, redelivery, and the dispatcher's
claims (leased, so a dead dispatcher's work is taken over) and attempt records."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.errors import NotFound, StateConflict
from gateway.models import (
    Attempt,
    Delivery,
    DeliveryClaim,
    Endpoint,
    EndpointPatch,
    EndpointSpec,
    Page,
)
from gateway.store.base import AttemptOutcome, decode_cursor, encode_cursor
from gateway.store.verbs.connection import Connection
from gateway.store.verbs.tx import Tx
from gateway.webhooks.guard import destination

CANDIDATES_PER_SLOT = 2  # rows a claim looks at per delivery it may lease
_ENDPOINT = (
    "SELECT id, url, events, pipeline_id, owner_job_id, owner_pipeline_id, enabled,"
    " disabled_reason, failing_since, created_at,"
    " (SELECT count(*) FROM webhook_deliveries AS d WHERE d.endpoint_id = webhook_endpoints.id"
    " AND d.state = 'failed') FROM webhook_endpoints"
)
_DELIVERY = (
    "SELECT d.id, d.endpoint_id, d.message_id, m.event_type, d.job_id, d.state, d.created_at,"
    " d.next_attempt_at FROM webhook_deliveries AS d"
    " JOIN webhook_messages AS m ON m.id = d.message_id"
)


def _endpoint(row: Sequence[Any]) -> Endpoint:
    return Endpoint(
        id=row[0],
        url=row[1],
        events=tuple(json.loads(row[2])),
        pipeline_id=row[3],
        owner_job_id=row[4],
        owner_pipeline_id=row[5],
        enabled=bool(row[6]),
        disabled_reason=row[7],
        failing_since=row[8],
        created_at=row[9],
        failed_deliveries=row[10],
    )


def _delivery(row: Sequence[Any], attempts: list[Attempt]) -> Delivery:
    return Delivery(
        id=row[0],
        endpoint_id=row[1],
        message_id=row[2],
        event_type=row[3],
        job_id=row[4],
        state=row[5],
        created_at=row[6],
        next_attempt_at=row[7],
        attempts=tuple(attempts),
    )


def _explicit(conn: Connection, endpoint_id: str) -> Endpoint:
    row = conn.execute(
        f"{_ENDPOINT} WHERE id = ? AND owner_job_id IS NULL AND owner_pipeline_id IS NULL"
        " AND deleted_at IS NULL",
        (endpoint_id,),
    ).fetchone()
    if row is None:
        raise NotFound(f"no webhook {endpoint_id}")
    return _endpoint(row)


def create_endpoint(tx: Tx, endpoint_id: str, spec: EndpointSpec, secret: str) -> Endpoint:
    tx.outbox.endpoints.invalidate()
    tx.conn.execute(
        "INSERT INTO webhook_endpoints (id, url, destination, events, pipeline_id, secret,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            endpoint_id,
            spec.url,
            destination(spec.url),
            json.dumps(spec.events),
            spec.pipeline_id,
            secret,
            tx.now,
        ),
    )
    return _explicit(tx.conn, endpoint_id)


def get_endpoint(conn: Connection, endpoint_id: str) -> Endpoint:
    return _explicit(conn, endpoint_id)


def list_endpoints(conn: Connection, *, limit: int, cursor: str | None) -> Page[Endpoint]:
    after = "" if cursor is None else decode_cursor(cursor, "w:")
    rows = conn.execute(
        f"{_ENDPOINT} WHERE owner_job_id IS NULL AND owner_pipeline_id IS NULL"
        " AND deleted_at IS NULL AND id > ? ORDER BY id LIMIT ?",
        (after, limit + 1),
    ).fetchall()
    items = [_endpoint(row) for row in rows[:limit]]
    more = len(rows) > limit
    return Page(items=items, next_cursor=encode_cursor("w:" + items[-1].id) if more else None)


def _skip_pending(tx: Tx, endpoint_id: str) -> None:
    tx.conn.execute(
        "UPDATE webhook_deliveries SET state = 'skipped', finished_at = ?, leased_until = NULL"
        " WHERE endpoint_id = ? AND state = 'pending'",
        (tx.now, endpoint_id),
    )


def _disable(tx: Tx, endpoint_id: str, reason: str) -> None:
    tx.outbox.endpoints.invalidate()
    tx.conn.execute(
        "UPDATE webhook_endpoints SET enabled = 0, disabled_reason = ? WHERE id = ?",
        (reason, endpoint_id),
    )
    _skip_pending(tx, endpoint_id)


def update_endpoint(tx: Tx, endpoint_id: str, patch: EndpointPatch) -> Endpoint:
    tx.outbox.endpoints.invalidate()
    _explicit(tx.conn, endpoint_id)
    if patch.url is not None:
        tx.conn.execute(
            "UPDATE webhook_endpoints SET url = ?, destination = ? WHERE id = ?",
            (patch.url, destination(patch.url), endpoint_id),
        )
    if patch.events is not None:
        tx.conn.execute(
            "UPDATE webhook_endpoints SET events = ? WHERE id = ?",
            (json.dumps(patch.events), endpoint_id),
        )
    if patch.enabled is True:
        tx.conn.execute(
            "UPDATE webhook_endpoints SET enabled = 1, disabled_reason = NULL,"
            " failing_since = NULL WHERE id = ?",
            (endpoint_id,),
        )
    elif patch.enabled is False:
        _disable(tx, endpoint_id, "disabled through the API")
    return _explicit(tx.conn, endpoint_id)


def delete_endpoint(tx: Tx, endpoint_id: str) -> None:
    tx.outbox.endpoints.invalidate()
    _explicit(tx.conn, endpoint_id)
    tx.conn.execute(
        "UPDATE webhook_endpoints SET deleted_at = ?, enabled = 0, disabled_reason = 'deleted'"
        " WHERE id = ?",
        (tx.now, endpoint_id),
    )
    _skip_pending(tx, endpoint_id)


def rotate_secret(tx: Tx, endpoint_id: str, secret: str, old_signs_until: float) -> Endpoint:
    _explicit(tx.conn, endpoint_id)
    tx.conn.execute(
        "UPDATE webhook_endpoints SET previous_secret = secret, previous_secret_until = ?,"
        " secret = ? WHERE id = ?",
        (old_signs_until, secret, endpoint_id),
    )
    return _explicit(tx.conn, endpoint_id)


def _attempts(conn: Connection, delivery_ids: list[str]) -> dict[str, list[Attempt]]:
    found: dict[str, list[Attempt]] = {d: [] for d in delivery_ids}
    if not delivery_ids:
        return found
    marks = ",".join("?" * len(delivery_ids))
    rows = conn.execute(
        "SELECT delivery_id, number, at, status_code, duration_ms, error, response_snippet"
        f" FROM webhook_attempts WHERE delivery_id IN ({marks}) ORDER BY delivery_id, number",
        delivery_ids,
    ).fetchall()
    for row in rows:
        found[row[0]].append(Attempt(*row[1:]))
    return found


def list_deliveries(
    conn: Connection,
    *,
    endpoint_id: str | None = None,
    job_id: str | None = None,
    limit: int,
    cursor: str | None,
) -> Page[Delivery]:
    """Newest first, each with its attempts."""
    params: list[Any]
    if endpoint_id is not None:
        _explicit(conn, endpoint_id)
        where, params = "d.endpoint_id = ?", [endpoint_id]
    else:
        if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
            raise NotFound(f"no job {job_id}")
        where, params = "d.job_id = ?", [job_id]
    if cursor is not None:
        where += " AND d.id < ?"
        params.append(decode_cursor(cursor, "d:"))
    rows = conn.execute(
        f"{_DELIVERY} WHERE {where} ORDER BY d.id DESC LIMIT ?", (*params, limit + 1)
    ).fetchall()
    attempts = _attempts(conn, [row[0] for row in rows[:limit]])
    items = [_delivery(row, attempts[row[0]]) for row in rows[:limit]]
    more = len(rows) > limit
    return Page(items=items, next_cursor=encode_cursor("d:" + items[-1].id) if more else None)


def redeliver(tx: Tx, delivery_id: str) -> Delivery:
    """The same event to the same endpoint again: a new delivery, same `webhook-id`."""
    row = tx.conn.execute(
        "SELECT d.message_id, d.endpoint_id, d.job_id, e.enabled FROM webhook_deliveries AS d"
        " JOIN webhook_endpoints AS e ON e.id = d.endpoint_id WHERE d.id = ?",
        (delivery_id,),
    ).fetchone()
    if row is None:
        raise NotFound(f"no delivery {delivery_id}")
    if not row[3]:
        raise StateConflict("the endpoint is disabled; enable it first (PATCH enabled: true)")
    new_id = tx.new_id()
    tx.conn.execute(
        "INSERT INTO webhook_deliveries (id, message_id, endpoint_id, job_id, state,"
        " next_attempt_at, created_at) VALUES (?, ?, ?, ?, 'pending', ?, ?)",
        (new_id, row[0], row[1], row[2], tx.now, tx.now),
    )
    tx.outbox.deliveries += 1
    return _delivery(tx.conn.execute(f"{_DELIVERY} WHERE d.id = ?", (new_id,)).fetchone(), [])


def claim_deliveries(
    tx: Tx,
    *,
    limit: int,
    lease_s: float,
    server_secret: str,
    in_flight: Mapping[str, int],
    per_destination: int,
) -> list[DeliveryClaim]:
    """Lease up to `limit` due deliveries (earliest first), at most `per_destination` minus
    its attempts `in_flight` for each receiver (its `destination`). Rows passed over for a
    full receiver are not leased; the caller claims again once that receiver is busy, since
    rows of other receivers may lie beyond the ones looked at."""
    busy = [d for d, n in in_flight.items() if n >= per_destination]
    # `NOT IN ()` is a syntax error on PostgreSQL: no clause when nothing is busy
    skip = ",".join("?" * len(busy))
    not_busy = f" AND e.destination NOT IN ({skip})" if busy else ""
    rows = tx.conn.execute(
        "SELECT d.id, d.endpoint_id, d.message_id, d.attempts, m.body, e.url, e.secret,"
        " e.previous_secret, e.previous_secret_until, e.owner_job_id, e.owner_pipeline_id,"
        " e.destination"
        " FROM webhook_deliveries AS d JOIN webhook_messages AS m ON m.id = d.message_id"
        " JOIN webhook_endpoints AS e ON e.id = d.endpoint_id"
        " WHERE d.state = 'pending' AND d.next_attempt_at <= ?"
        " AND (d.leased_until IS NULL OR d.leased_until < ?)"
        f"{not_busy} ORDER BY d.next_attempt_at LIMIT ?{tx.dialect.skip_locked('d')}",
        (tx.now, tx.now, *busy, CANDIDATES_PER_SLOT * limit),
    ).fetchall()
    room = {d: per_destination - n for d, n in in_flight.items()}
    picked = []
    for row in rows:
        destination = row[11]
        if room.setdefault(destination, per_destination) > 0:
            room[destination] -= 1
            picked.append(row)
            if len(picked) == limit:
                break
    rows = picked
    claims = []
    for row in rows:
        (delivery_id, endpoint_id, message_id, attempts, body, url, secret, previous, until) = row[
            :9
        ]
        implicit = row[9] is not None or row[10] is not None
        secrets = [secret] if secret else ([server_secret] if implicit else [])
        if previous and until is not None and until > tx.now:
            secrets.append(previous)
        claims.append(
            DeliveryClaim(
                delivery_id=delivery_id,
                endpoint_id=endpoint_id,
                message_id=message_id,
                url=url,
                body=body,
                secrets=tuple(secrets),
                attempt=attempts + 1,
                destination=row[11],
            )
        )
    if claims:
        marks = ",".join("?" * len(claims))
        tx.conn.execute(
            f"UPDATE webhook_deliveries SET leased_until = ? WHERE id IN ({marks})",
            (tx.now + lease_s, *(claim.delivery_id for claim in claims)),
        )
    return claims


_RECORD_ATTEMPT = (
    "INSERT INTO webhook_attempts (delivery_id, number, at, status_code, duration_ms, error,"
    " response_snippet) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (delivery_id, number)"
    " DO UPDATE SET at = excluded.at, status_code = excluded.status_code,"
    " duration_ms = excluded.duration_ms, error = excluded.error,"
    " response_snippet = excluded.response_snippet"
)
_MOVE_ON = (
    "UPDATE webhook_deliveries SET state = ?, attempts = ?, next_attempt_at = ?,"
    " leased_until = NULL, finished_at = ? WHERE id = ? AND state = 'pending'"
)


def _next_state(outcome: AttemptOutcome) -> tuple[str, float | None]:
    if outcome.succeeded:
        return "succeeded", None
    if outcome.next_attempt_at is not None and outcome.disable_reason is None:
        return "pending", outcome.next_attempt_at
    return "failed", None


def record_attempts(
    tx: Tx, results: Sequence[tuple[DeliveryClaim, AttemptOutcome]], disable_after_s: float
) -> None:
    """Log each attempt and move its delivery on (one statement for all the attempts, one for
    all the deliveries); then per endpoint, in the order of `results`: a success stops its
    failure clock, a failure starts it, 410 disables it at once, and one failing for
    `disable_after_s` without a success is disabled."""
    if not results:
        return
    tx.conn.executemany(
        _RECORD_ATTEMPT,
        [
            (
                claim.delivery_id,
                claim.attempt,
                tx.now,
                outcome.status_code,
                outcome.duration_ms,
                outcome.error,
                outcome.response_snippet,
            )
            for claim, outcome in results
        ],
    )
    moves = []
    for claim, outcome in results:
        state, next_at = _next_state(outcome)
        finished = None if state == "pending" else tx.now
        moves.append((state, claim.attempt, next_at, finished, claim.delivery_id))
    tx.conn.executemany(_MOVE_ON, moves)
    recovered: set[str] = set()
    failing: dict[str, AttemptOutcome] = {}  # failed after its last success in `results`
    gone: dict[str, str] = {}
    for claim, outcome in results:
        endpoint_id = claim.endpoint_id
        if outcome.disable_reason is not None:
            gone.setdefault(endpoint_id, outcome.disable_reason)
        elif outcome.succeeded:
            recovered.add(endpoint_id)
            failing.pop(endpoint_id, None)
        else:
            failing[endpoint_id] = outcome
    if recovered:
        # Only a row whose clock runs is written: a healthy endpoint's row is not locked.
        tx.conn.executemany(
            "UPDATE webhook_endpoints SET failing_since = NULL"
            " WHERE id = ? AND failing_since IS NOT NULL",
            [(endpoint_id,) for endpoint_id in sorted(recovered)],
        )
    for endpoint_id, outcome in sorted(failing.items()):
        if endpoint_id in gone:
            continue
        row = tx.conn.execute(
            "UPDATE webhook_endpoints SET failing_since = COALESCE(failing_since, ?)"
            " WHERE id = ? RETURNING failing_since, enabled",
            (tx.now, endpoint_id),
        ).fetchone()
        if row is not None and row[1] and tx.now - row[0] >= disable_after_s:
            last = outcome.error or f"HTTP {outcome.status_code}"
            reason = f"every attempt failed for {int(tx.now - row[0])} s (last: {last})"
            _disable(tx, endpoint_id, reason)
    for endpoint_id, reason in sorted(gone.items()):
        _disable(tx, endpoint_id, reason)


def next_due(conn: Connection) -> float | None:
    """When the earliest pending delivery is due (for the dispatcher's sleep)."""
    row = conn.execute(
        "SELECT min(CASE WHEN leased_until > next_attempt_at THEN leased_until"
        " ELSE next_attempt_at END)"
        " FROM webhook_deliveries WHERE state = 'pending'"
    ).fetchone()
    return None if row is None else row[0]
