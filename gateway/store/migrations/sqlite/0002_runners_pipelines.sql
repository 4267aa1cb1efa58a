-- 0002: runners, pipelines with needs, hand-outs and early callbacks.
CREATE TABLE runners (
    id TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    tags TEXT NOT NULL,
    run_untagged INTEGER NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    last_seen_at REAL,
    revoked_at REAL
);

CREATE TABLE pipelines (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    canceled INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    event_sequence INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX pipelines_by_state ON pipelines (state, id);

CREATE TABLE pipeline_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline_id TEXT NOT NULL REFERENCES pipelines (id) ON DELETE CASCADE,
    sequence INTEGER NOT NULL,
    state TEXT NOT NULL,
    previous_state TEXT,
    at REAL NOT NULL,
    UNIQUE (pipeline_id, sequence)
);

ALTER TABLE jobs ADD COLUMN needs TEXT;
ALTER TABLE jobs ADD COLUMN queued_at REAL;
ALTER TABLE jobs ADD COLUMN runner_id TEXT REFERENCES runners (id);
ALTER TABLE jobs ADD COLUMN job_token_hash BLOB;
ALTER TABLE jobs ADD COLUMN runner_deadline_at REAL;
ALTER TABLE jobs ADD COLUMN confirm_deadline_at REAL;
ALTER TABLE jobs ADD COLUMN early_callback TEXT;

CREATE UNIQUE INDEX jobs_by_job_token ON jobs (job_token_hash) WHERE job_token_hash IS NOT NULL;
CREATE INDEX jobs_queue ON jobs (queued_at, id) WHERE state = 'pending' AND runner_id IS NULL AND kind = 'script';
