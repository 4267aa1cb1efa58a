"""Pipeline verbs: create (with all its jobs), read, list, cancel."""

from __future__ import annotations

from gateway.errors import AlreadyFinal
from gateway.models import Page, Pipeline, PipelineSpec, PipelineView
from gateway.pipelines import PipelineState
from gateway.states import Trigger
from gateway.store.base import Minter, PipelineResult, decode_cursor, encode_cursor
from gateway.store.verbs.connection import Connection
from gateway.store.verbs.tx import ENCODE, SELECT_PIPELINE, Tx, load_pipeline


def create_pipeline(
    tx: Tx, pipeline_id: str, spec: PipelineSpec, job_ids: dict[str, str], minter: Minter
) -> PipelineResult:
    """The pipeline row, then every job in definition order (the caller checked the DAG)."""
    tx.conn.execute(
        "INSERT INTO pipelines (id, name, state, spec, created_at) VALUES (?, ?, ?, ?, ?)",
        (pipeline_id, spec.name, PipelineState.PENDING.value, ENCODE.encode(spec).decode(), tx.now),
    )
    if spec.state_webhook_url:
        tx.add_implicit_endpoint(
            spec.state_webhook_url, spec.state_webhook_secret, pipeline_id=pipeline_id
        )
    for name, job in spec.jobs.items():
        tx.insert_job(
            job_ids[name], job.job_spec(name), minter, pipeline_id=pipeline_id, needs=job.needs
        )
    tx.settle()
    return PipelineResult(view=view(tx, pipeline_id), changes=tx.changes())


def view(tx: Tx, pipeline_id: str) -> PipelineView:
    pipeline, _ = tx.pipeline(pipeline_id)
    return PipelineView(pipeline=pipeline, jobs=[lj.job for lj in tx.latest_jobs(pipeline)])


def list_pipelines(
    conn: Connection, *, state: PipelineState | None, limit: int, cursor: str | None
) -> Page[Pipeline]:
    clauses, params = [], []
    if state is not None:
        clauses.append("state = ?")
        params.append(state.value)
    if cursor is not None:
        clauses.append("id < ?")
        params.append(decode_cursor(cursor, "p:"))
    where = " AND ".join(clauses) or "1 = 1"
    rows = conn.execute(
        f"{SELECT_PIPELINE} WHERE {where} ORDER BY id DESC LIMIT ?", (*params, limit + 1)
    ).fetchall()
    pipelines = [load_pipeline(row)[0] for row in rows[:limit]]
    more = len(rows) > limit
    return Page(
        items=pipelines, next_cursor=encode_cursor("p:" + pipelines[-1].id) if more else None
    )


def cancel_pipeline(tx: Tx, pipeline_id: str) -> PipelineResult:
    """Cancel every unfinished job; the pipeline is `canceled` (409 if it had ended)."""
    pipeline, _ = tx.pipeline(pipeline_id)
    if pipeline.state.terminal:
        raise AlreadyFinal(pipeline.state.value, None)
    tx.conn.execute("UPDATE pipelines SET canceled = 1 WHERE id = ?", (pipeline_id,))
    for loaded in tx.latest_jobs(pipeline):
        if not loaded.job.state.terminal:
            tx.apply(loaded, Trigger.CANCEL, "pipeline_cancel")
    tx.touch_pipeline(pipeline_id)
    tx.settle()
    return PipelineResult(view=view(tx, pipeline_id), changes=tx.changes())
