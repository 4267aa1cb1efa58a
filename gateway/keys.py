"""Server secrets: taken from the environment, or generated once into the data dir (mode 0600)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gateway.tokens import new_api_token, new_secret
from gateway.webhooks.signing import new_secret as new_webhook_secret

SECRET_KEY_FILE = "secret-key"
ADMIN_TOKEN_FILE = "admin-token"
WEBHOOK_SECRET_FILE = "webhook-secret"


@dataclass(frozen=True)
class Secret:
    """A secret value and where it came from (for the start-up message; never the value)."""

    value: str
    path: Path | None
    created: bool


def load_or_create(configured: str | None, data_dir: Path, filename: str) -> Secret:
    """`configured` when given; else the file in `data_dir`, created 0600 on first use."""
    if configured:
        return Secret(configured, None, False)
    path = data_dir / filename
    if path.exists():
        return Secret(path.read_text().strip(), path, False)
    data_dir.mkdir(parents=True, exist_ok=True)
    makers = {ADMIN_TOKEN_FILE: new_api_token, WEBHOOK_SECRET_FILE: new_webhook_secret}
    value = makers.get(filename, new_secret)()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return Secret(value, path, True)
