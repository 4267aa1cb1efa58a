-- 0005: every job and pipeline event in one log with a global, increasing sequence (the `id:`
-- of the live event stream). An event that an endpoint wanted points at its frozen webhook
-- message; the others are rendered from the job or pipeline when read.
CREATE TABLE event_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    job_id TEXT,
    pipeline_id TEXT,
    message_id TEXT,
    created_at REAL NOT NULL,
    UNIQUE (kind, owner_id, sequence)
);

CREATE INDEX event_log_by_pipeline ON event_log (pipeline_id, seq) WHERE pipeline_id IS NOT NULL;
CREATE INDEX event_log_by_job ON event_log (job_id, seq) WHERE job_id IS NOT NULL;
