-- 0003: state webhooks: endpoints (explicit subscriptions, and the implicit ones of a job's or
-- pipeline's state_webhook_url), one message per event (the outbox), one delivery per matching
-- endpoint, every attempt.
CREATE TABLE webhook_endpoints (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    pipeline_id TEXT,
    owner_job_id TEXT,
    owner_pipeline_id TEXT,
    secret TEXT,
    previous_secret TEXT,
    previous_secret_until DOUBLE PRECISION,
    enabled INTEGER NOT NULL DEFAULT 1,
    disabled_reason TEXT,
    failing_since DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    deleted_at DOUBLE PRECISION
);

CREATE INDEX webhook_endpoints_by_job ON webhook_endpoints (owner_job_id)
    WHERE owner_job_id IS NOT NULL;
CREATE INDEX webhook_endpoints_by_pipeline ON webhook_endpoints (owner_pipeline_id)
    WHERE owner_pipeline_id IS NOT NULL;

CREATE TABLE webhook_messages (
    id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    job_id TEXT,
    pipeline_id TEXT,
    body BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    message_id TEXT NOT NULL REFERENCES webhook_messages (id) ON DELETE CASCADE,
    endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints (id),
    job_id TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION,
    leased_until DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, id);
CREATE INDEX webhook_deliveries_by_job ON webhook_deliveries (job_id, id)
    WHERE job_id IS NOT NULL;

CREATE TABLE webhook_attempts (
    delivery_id TEXT NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    status_code INTEGER,
    duration_ms DOUBLE PRECISION NOT NULL,
    error TEXT,
    response_snippet TEXT,
    PRIMARY KEY (delivery_id, number)
);
