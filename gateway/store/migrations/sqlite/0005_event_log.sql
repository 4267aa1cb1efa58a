-- 0005: every job and pipeline event in one log with a global, increasing sequence (the
-- `id:` of the live event stream); the event's body is its webhook message, now written for
-- every event, not only those an endpoint wants.
CREATE TABLE event_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE REFERENCES webhook_messages (id) ON DELETE CASCADE,
    job_id TEXT,
    pipeline_id TEXT,
    created_at REAL NOT NULL
);

INSERT INTO event_log (message_id, job_id, pipeline_id, created_at)
    SELECT id, job_id, pipeline_id, created_at FROM webhook_messages ORDER BY rowid;

CREATE INDEX event_log_by_pipeline ON event_log (pipeline_id, seq) WHERE pipeline_id IS NOT NULL;
CREATE INDEX event_log_by_job ON event_log (job_id, seq) WHERE job_id IS NOT NULL;
