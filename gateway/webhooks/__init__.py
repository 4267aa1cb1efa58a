"""State webhooks: Standard Webhooks signing, the private-address guard, and the outbox
dispatcher that delivers every recorded event at least once."""
