-- 0004: artifacts (files a job's runner or external system uploads), their metadata copied
-- onto the job row so every read of a job carries it without another query, and the indexes
-- retention needs to delete a job's webhook messages and deliveries without scanning.
CREATE TABLE artifacts (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (job_id, name)
);

ALTER TABLE jobs ADD COLUMN artifacts TEXT;

CREATE INDEX webhook_messages_by_job ON webhook_messages (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX webhook_messages_by_pipeline ON webhook_messages (pipeline_id)
    WHERE pipeline_id IS NOT NULL;
CREATE INDEX webhook_deliveries_by_message ON webhook_deliveries (message_id);
