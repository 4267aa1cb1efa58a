"""Artifact verbs: uploads through the continue URL (a heartbeat) or by the job's
runner (a runner ping), and reads.

The bytes live in `artifacts`; the job row keeps a copy of their metadata in its `artifacts`
column, rewritten with every upload in the same transaction, so every read of a job (GET, lists,
webhook bodies) carries the list without another query.
"""

from __future__ import annotations

import json

from gateway.artifacts import ArtifactUpload
from gateway.errors import AlreadyFinal, IllegalTransition, NotFound
from gateway.models import Artifact
from gateway.states import State, Trigger
from gateway.store.base import ArtifactBlob, ArtifactStored
from gateway.store.verbs.connection import Connection
from gateway.store.verbs.jobs import UNKNOWN_TOKEN
from gateway.store.verbs.runners import _job_for_runner
from gateway.store.verbs.tx import Loaded, Tx


def put_by_continue(tx: Tx, token_hash: bytes, upload: ArtifactUpload) -> ArtifactStored:
    loaded = tx.find_job("token_hash = ?", token_hash)
    if loaded is None:
        raise NotFound(UNKNOWN_TOKEN)
    if tx.lifecycle(loaded.job).takes_early_callback:
        # The async script still runs: the upload is kept (a result may come before the
        # terminal call does), and the heartbeat clock starts only when the job parks.
        return _keep(tx, loaded, upload)
    touched = tx.apply(loaded, Trigger.HEARTBEAT, "continue:artifact")
    return _keep(tx, touched, upload)


def put_by_runner(
    tx: Tx, job_id: str, job_token_hash: bytes, upload: ArtifactUpload
) -> ArtifactStored:
    loaded = _job_for_runner(tx, job_id, job_token_hash)
    if loaded.job.state.terminal:
        raise AlreadyFinal(loaded.job.state, loaded.job.failure_reason)
    if loaded.job.state is not State.RUNNING:
        raise IllegalTransition(loaded.job.state, "an artifact upload")
    pinged = tx.apply(loaded, Trigger.RUNNER_PING, "runner")
    return _keep(tx, pinged, upload)


def _keep(tx: Tx, loaded: Loaded, upload: ArtifactUpload) -> ArtifactStored:
    """Store the upload (replacing one of the same name) and refresh the job's copy of the
    metadata, ordered by name."""
    job_id = loaded.job.id
    tx.conn.execute(
        "INSERT INTO artifacts (job_id, name, content_type, size, sha256, created_at, data)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, name) DO UPDATE SET"
        " content_type = excluded.content_type, size = excluded.size,"
        " sha256 = excluded.sha256, created_at = excluded.created_at, data = excluded.data",
        (
            job_id,
            upload.name,
            upload.content_type,
            len(upload.data),
            upload.sha256,
            tx.now,
            upload.data,
        ),
    )
    rows = tx.conn.execute(
        "SELECT name, content_type, size, sha256 FROM artifacts WHERE job_id = ? ORDER BY name",
        (job_id,),
    ).fetchall()
    listing = [
        {"name": name, "content_type": content_type, "size": size, "sha256": sha256}
        for name, content_type, size, sha256 in rows
    ]
    tx.conn.execute("UPDATE jobs SET artifacts = ? WHERE id = ?", (json.dumps(listing), job_id))
    return ArtifactStored(job=tx.job(job_id).job, artifact=upload.artifact, changes=tx.changes())


def get_artifact(conn: Connection, job_id: str, name: str) -> ArtifactBlob | None:
    row = conn.execute(
        "SELECT name, content_type, size, sha256, data FROM artifacts"
        " WHERE job_id = ? AND name = ?",
        (job_id, name),
    ).fetchone()
    if row is None:
        return None
    return ArtifactBlob(artifact=Artifact(*row[:4]), data=row[4])
