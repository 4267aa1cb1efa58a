"""Retention : delete terminal jobs and finished pipelines older than the cut-off, with
everything they own, a small batch per transaction.

A standalone job goes with its earlier attempts once its latest attempt is terminal and old
(an attempt's `retry_of` points at the one before). A pipeline's jobs go only with the
pipeline, once it is finished and old: removing some of its jobs would change what it is.
Candidates are found by state and id: ids are ULIDs, so nothing created after the cut-off is
looked at, and no index is added to the hot path for retention's sake. No ORDER BY: a batch
takes the first candidates the index gives, and stops scanning there.

What a job owns: events, trace and artifacts (foreign keys cascade), its webhook messages (and
with them deliveries, attempts and event-log entries), its implicit endpoints.
"""

from __future__ import annotations

import json

from ulid import ULID

from gateway.pipelines import PipelineState
from gateway.states import TERMINAL_STATES
from gateway.store.base import Pruned
from gateway.store.verbs.tx import Tx

_TERMINAL = ", ".join(f"'{state.value}'" for state in sorted(TERMINAL_STATES))
_PIPELINE_TERMINAL = ", ".join(f"'{state.value}'" for state in PipelineState if state.terminal)
_IDS = "(SELECT value FROM json_each(?))"

# Latest attempts of standalone jobs that are terminal and old, with their earlier attempts.
_DOOMED_JOBS = f"""
WITH RECURSIVE doomed(id, latest) AS (
    SELECT id, 1 FROM (
        SELECT id FROM jobs
        WHERE id < ? AND pipeline_id IS NULL AND state IN ({_TERMINAL})
        AND finished_at < ?
        AND NOT EXISTS (SELECT 1 FROM jobs AS later WHERE later.retry_of = jobs.id)
        AND NOT EXISTS (
            SELECT 1 FROM webhook_deliveries AS d WHERE d.job_id = jobs.id
            AND d.state = 'pending' AND d.leased_until >= ?
        )
        LIMIT ?
    ) AS candidates
    UNION ALL
    SELECT jobs.retry_of, 0 FROM jobs JOIN doomed ON jobs.id = doomed.id
    WHERE jobs.retry_of IS NOT NULL
)
SELECT id, latest FROM doomed
"""

_DOOMED_PIPELINES = f"""
SELECT p.id, (SELECT count(*) FROM jobs WHERE jobs.pipeline_id = p.id)
FROM pipelines AS p
WHERE p.id < ? AND p.state IN ({_PIPELINE_TERMINAL}) AND p.finished_at < ?
AND NOT EXISTS (
    SELECT 1 FROM jobs WHERE jobs.pipeline_id = p.id AND jobs.state NOT IN ({_TERMINAL})
)
AND NOT EXISTS (
    SELECT 1 FROM webhook_messages AS m JOIN webhook_deliveries AS d ON d.message_id = m.id
    WHERE m.pipeline_id = p.id AND d.state = 'pending' AND d.leased_until >= ?
)
LIMIT ?
"""


def id_bound(before: float) -> str:
    """The smallest ULID of the millisecond after `before`: every id minted up to `before`
    sorts below it."""
    return str(ULID.from_int((int(before * 1000) + 1) << 80))


def prune(tx: Tx, before: float, limit: int) -> Pruned:
    params = (id_bound(before), before, tx.now, limit)  # the `?`s of both queries, in order
    rows = tx.conn.execute(_DOOMED_JOBS, params).fetchall()
    job_ids = [row[0] for row in rows]
    latest = sum(row[1] for row in rows)
    _delete_jobs(tx, job_ids)
    pipelines, pipeline_jobs, more_pipelines = _prune_pipelines(tx, params, limit)
    return Pruned(
        jobs=len(job_ids) + pipeline_jobs,
        pipelines=pipelines,
        more=latest >= limit or more_pipelines,
    )


def _delete_jobs(tx: Tx, job_ids: list[str]) -> None:
    if not job_ids:
        return
    ids = json.dumps(job_ids)
    tx.conn.execute(f"DELETE FROM webhook_messages WHERE job_id IN {_IDS}", (ids,))
    tx.conn.execute(f"DELETE FROM event_log WHERE job_id IN {_IDS}", (ids,))
    tx.conn.execute(f"DELETE FROM webhook_endpoints WHERE owner_job_id IN {_IDS}", (ids,))
    # One statement: an attempt and the retry that points at it go together.
    tx.conn.execute(f"DELETE FROM jobs WHERE id IN {_IDS}", (ids,))


def _prune_pipelines(tx: Tx, params: tuple[object, ...], limit: int) -> tuple[int, int, bool]:
    """Finished, old pipelines while their jobs fit in `limit` (at least one pipeline per
    batch, however many jobs it has); (pipelines, jobs, more left)."""
    candidates = tx.conn.execute(_DOOMED_PIPELINES, params).fetchall()
    pipelines = jobs = 0
    for pipeline_id, job_count in candidates:
        if pipelines and jobs + job_count > limit:
            return pipelines, jobs, True
        _delete_pipeline(tx, pipeline_id)
        pipelines += 1
        jobs += job_count
    return pipelines, jobs, len(candidates) >= limit


def _delete_pipeline(tx: Tx, pipeline_id: str) -> None:
    tx.conn.execute("DELETE FROM webhook_messages WHERE pipeline_id = ?", (pipeline_id,))
    tx.conn.execute("DELETE FROM event_log WHERE pipeline_id = ?", (pipeline_id,))
    tx.conn.execute("DELETE FROM webhook_endpoints WHERE owner_pipeline_id = ?", (pipeline_id,))
    tx.conn.execute(
        "DELETE FROM webhook_endpoints WHERE owner_job_id IN"
        " (SELECT id FROM jobs WHERE pipeline_id = ?)",
        (pipeline_id,),
    )
    tx.conn.execute("DELETE FROM jobs WHERE pipeline_id = ?", (pipeline_id,))
    tx.conn.execute("DELETE FROM pipelines WHERE id = ?", (pipeline_id,))
