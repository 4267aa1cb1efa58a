-- 0006: the receiver an endpoint sends to (scheme, host, port and path). The dispatcher's cap
-- on attempts in flight counts by receiver, so many jobs whose state_webhook_url names one
-- receiver share one cap and a hanging receiver cannot take every slot.
ALTER TABLE webhook_endpoints ADD COLUMN destination TEXT;
UPDATE webhook_endpoints SET destination = url;
CREATE INDEX webhook_endpoints_by_destination ON webhook_endpoints (destination);
