-- 0001: jobs, their transition history and traces; bearer tokens; server metadata.
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash BLOB NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    pipeline_id TEXT,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    is_async INTEGER NOT NULL,
    state TEXT NOT NULL,
    failure_reason TEXT,
    exit_code INTEGER,
    message TEXT,
    outputs TEXT,
    result TEXT,
    attempt INTEGER NOT NULL,
    retry_of TEXT UNIQUE REFERENCES jobs (id),
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    parked_at REAL,
    finished_at REAL,
    execution_deadline_at REAL,
    callback_deadline_at REAL,
    heartbeat_deadline_at REAL,
    queue_deadline_at REAL,
    deadline_at REAL,
    token_nonce BLOB,
    token_hash BLOB UNIQUE,
    callback_digest BLOB,
    callback_key TEXT,
    event_sequence INTEGER NOT NULL DEFAULT 0,
    trace_size INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX jobs_due ON jobs (deadline_at) WHERE deadline_at IS NOT NULL;
CREATE INDEX jobs_by_state ON jobs (state, id);
CREATE INDEX jobs_by_pipeline ON jobs (pipeline_id, id) WHERE pipeline_id IS NOT NULL;

CREATE TABLE job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    sequence INTEGER NOT NULL,
    state TEXT NOT NULL,
    previous_state TEXT,
    failure_reason TEXT,
    cause TEXT NOT NULL,
    at REAL NOT NULL,
    UNIQUE (job_id, sequence)
);

CREATE TABLE job_trace (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, offset)
) WITHOUT ROWID;
